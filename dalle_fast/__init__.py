"""dalle_fast: DALL-E (Ramesh et al. 2021) with fused C++/CUDA kernels.

Importing never touches CUDA; a missing build raises ExtensionNotBuiltError saying how to build.
"""
__version__ = "0.1.0"

from . import _extension

_C = _extension.load()
backends = _extension.backends

from .ops.diffusion import dynamic_threshold, guided_step  # noqa: E402
from .ops.gumbel_softmax import gumbel_softmax, one_hot_argmax  # noqa: E402
from .ops.householder_qr import householder_qr  # noqa: E402
from .ops.logit_laplace import logit_laplace_loss, map_pixels, unmap_pixels  # noqa: E402
from .ops.resblock_scaling import resblock_grad_scale, resblock_unscale_grads_  # noqa: E402
from .ops.sparse_attention import (  # noqa: E402
    attention_mask, attention_schedule, sparse_attention, sparse_attention_decode)
from .ops.decode_step import transformer_decode_step  # noqa: E402  (every op module: every fake kernel)

__all__ = [
    "gumbel_softmax", "one_hot_argmax", "logit_laplace_loss", "map_pixels", "unmap_pixels",
    "attention_mask", "attention_schedule", "sparse_attention", "sparse_attention_decode", "transformer_decode_step",
    "dynamic_threshold", "guided_step", "householder_qr", "resblock_grad_scale",
    "resblock_unscale_grads_", "backends", "__version__",
]
