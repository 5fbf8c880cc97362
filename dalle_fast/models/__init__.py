"""Models: the dVAE (stage 1, models.dvae) and the DALL-E transformer (stage 2, models.dalle)."""
from .dalle import DALLE, DALLEConfig  # noqa: F401
from .dvae import DiscreteVAE, DVAEConfig  # noqa: F401
