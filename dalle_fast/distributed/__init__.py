"""Training on many processes with torch.distributed: PowerSGD gradient compression (the DALL-E paper's
Appendix E choices, powersgd.py), FSDP2 / DDP wrapping and process-group set-up (sharding.py)."""
from .powersgd import PowerSGDState, compressible_parameters, paper_compression_rate, powersgd_hook

__all__ = ["PowerSGDState", "powersgd_hook", "compressible_parameters", "paper_compression_rate"]
