"""Pure-PyTorch reference of the batched Householder QR (dalle_fast.ops.householder_qr).

The truth is LAPACK's QR in float64 of A + eps * I, with Q's columns signed so that R has a
non-negative diagonal (the kernel's convention, which makes Q unique for a full-rank A). For the
zero-column case LAPACK's Q is used as is: any orthonormal completion is a valid answer there.
"""
import torch


def add_eps_identity(a, eps):
    """A + eps * I on the first cols diagonal entries of every matrix of a (batch, rows, cols)."""
    n = a.shape[-1]
    out = a.clone()
    out.diagonal(dim1=-2, dim2=-1)[..., :n] += eps
    return out


def householder_qr(a, eps=0.0):
    """Thin Q (batch, rows, cols) of a + eps * I, computed in float64 and returned in float64."""
    q, r = torch.linalg.qr(add_eps_identity(a.double(), eps), mode="reduced")
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign.unsqueeze(-2)


def gram_schmidt(a, eps=0.0):
    """Classical column-by-column Gram-Schmidt in a's dtype, as torch's powerSGD_hook does for fp16/bf16
    (each column normalised by its norm + eps): the baseline that loses orthogonality."""
    q = a.clone()
    for i in range(q.shape[-1]):
        col = q[..., i:i + 1]
        col /= torch.linalg.vector_norm(col, dim=-2, keepdim=True) + eps
        if i + 1 < q.shape[-1]:
            rest = q[..., i + 1:]
            rest -= (col.transpose(-2, -1) @ rest) * col
    return q


def orthogonality_error(q):
    """max |Q^T Q - I| in float64: 0 for exactly orthonormal columns."""
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (q.transpose(-2, -1) @ q - eye).abs().amax().item() if q.numel() else 0.0
