"""Training: shared pieces in train.common; the dVAE trainer in train.vae (train_vae,
`dalle-fast train-vae`); the transformer's in train.dalle."""
from .common import EMA, MetricLog, Progress, ResumableBatches, autocast, choose_device, choose_precision, cosine


def train_vae(*args, **kwargs):
    """See dalle_fast.train.vae.train_vae (imported lazily: the CLI imports every trainer)."""
    from .vae import train_vae as _train_vae
    return _train_vae(*args, **kwargs)


__all__ = ["cosine", "EMA", "MetricLog", "Progress", "ResumableBatches", "autocast", "choose_device",
           "choose_precision", "train_vae"]
