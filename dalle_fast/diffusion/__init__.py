"""Diffusion models: Imagen-style cascaded diffusion and DALL-E 2's unCLIP, as thin modules.

schedule.py (noise schedules, eps / v / x0), sampling.py (DDPM / DDIM with classifier-free guidance
and dynamic thresholding, each step one fused op: dalle_fast.ops.diffusion.guided_step), unet.py (an
efficient U-Net), prior.py (unCLIP's diffusion prior), text_encoder.py (frozen BERT / CLIP text
encoders, offline), models.py, pipelines.py.
"""
from .models import PixelDiffusion
from .pipelines import FAMILIES, Imagen, UnCLIP, load_pipeline, slerp
from .prior import DiffusionPrior
from .sampling import sample
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig

__all__ = ["NoiseSchedule", "sample", "UNet", "UNetConfig", "PixelDiffusion",
           "DiffusionPrior", "Imagen", "UnCLIP", "load_pipeline", "slerp", "FAMILIES"]
