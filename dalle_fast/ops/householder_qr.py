"""Batched Householder QR of tall-skinny matrices: PowerSGD's orthogonalisation (dalle_fast.distributed).

householder_qr(A, eps) returns the thin Q of A + eps * I with orthonormal columns for every matrix of a
batch in one call: fp32 arithmetic for fp16/bf16/fp32 inputs (fp64 for fp64), Q stored in A's dtype.
Householder reflections keep Q orthonormal to rounding whatever A's conditioning, where Gram-Schmidt
(torch's powerSGD_hook for fp16/bf16 or rank <= 2) loses orthogonality on ill-conditioned inputs and
divides 0 by 0 on a zero column; a zero column here gives an orthonormal Q column (a reflection of
the identity). A non-finite input gives NaN in Q (PowerSGD then skips the update). Not differentiable:
PowerSGD runs it on gradients, outside autograd.
"""
import math

import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ops = torch.ops.dalle_fast


def householder_qr(a, eps=0.0):
    """Thin Q of the Householder QR of a + eps * I, for a batch of tall matrices in one call.

    Args:
        a: (batch, rows, cols) or (rows, cols) with rows >= cols; float32/float64/float16/bfloat16
            (float64 on the CPU only).
        eps: added to the diagonal first (the paper's 1e-6 keeps zero columns finite).
    Returns:
        Q of a's shape and dtype, orthonormal columns.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"householder_qr: A must be a tensor, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"householder_qr: A must be float32, float64, float16 or bfloat16, got {a.dtype}")
    if a.dim() not in (2, 3):
        raise ValueError(f"householder_qr: A must be (rows, cols) or (batch, rows, cols), got shape {tuple(a.shape)}")
    if a.device.type == "cuda" and a.dtype == torch.float64:
        raise TypeError("householder_qr: float64 runs on the CPU only; on CUDA pass float32, float16 or bfloat16")
    if a.shape[-2] < a.shape[-1]:
        raise ValueError(f"householder_qr: A must be tall (rows >= cols), got shape {tuple(a.shape)}; transpose it")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"householder_qr: eps must be finite and >= 0, got {eps}")
    if a.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("householder_qr is not differentiable (it orthogonalises gradients); pass a.detach()")
    q = _ops.householder_qr(a if a.dim() == 3 else a.unsqueeze(0), eps)
    return q if a.dim() == 3 else q.squeeze(0)


@torch.library.register_fake("dalle_fast::householder_qr")
def _(a, eps):
    torch._check(a.dim() == 3, lambda: f"householder_qr: A must be (batch, rows, cols), got {a.dim()} dims")
    torch._check(a.dtype in _FLOATS, lambda: f"householder_qr: A must be a float tensor, got {a.dtype}")
    torch._check(a.shape[1] >= a.shape[2], lambda: "householder_qr: A must be tall (rows >= cols)")
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)
