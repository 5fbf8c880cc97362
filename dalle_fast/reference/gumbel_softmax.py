"""Pure-PyTorch reference of the fused Gumbel-softmax, including its counter-based noise.

The noise follows the definition in csrc/include/dalle_fast/gumbel_softmax.h exactly (Philox4x32-10
on the flat element index), so with the same seed the reference reproduces the fused op's output
(in float64: to rounding). Written for clarity; runs on any device and in any float dtype.
"""
import math

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a, b):
    """(hi, lo) 32-bit words of a * b for uint32 values held in int64 tensors (a) and an int (b).
    The product can reach 2^64, so it is formed from 16-bit halves of a to stay inside int64."""
    t1 = (a & 0xFFFF) * b
    t2 = (a >> 16) * b
    s = ((t2 & 0xFFFF) << 16) + t1
    return (t2 >> 16) + (s >> 32), s & _MASK32


def philox4x32(counter, key, rounds=10):
    """Philox4x32-R. counter: 4 int64 tensors (or ints) of uint32 values; key: 2 ints.
    Returns the 4 output words as int64 tensors (Random123's philox4x32_R)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def noise_bits(numel, seed, device="cpu"):
    """The 32 random bits of flat elements 0..numel-1 for a seed (an int64 value)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    e = torch.arange(numel, dtype=torch.int64, device=device)
    block = e >> 6
    words = philox4x32((block & _MASK32, block >> 32, e & 15, torch.zeros_like(e)),
                       (seed & _MASK32, seed >> 32))
    return torch.stack(words).gather(0, ((e >> 4) & 3).unsqueeze(0)).squeeze(0)


def gumbel_noise(shape, seed, dtype=torch.float64, device="cpu"):
    """The standard-Gumbel noise the fused op draws for a seed: -log(-log(u)) with
    u = (bits / 2^9 + 1/2) / 2^23. Computed in float64 for float64, else in float32 (as the
    kernel does), then cast to dtype."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    bits = noise_bits(math.prod(shape), seed, device)
    u = ((bits >> 9).to(work) + 0.5) * 2.0 ** -23
    return (-torch.log(-torch.log(u))).reshape(shape).to(dtype)


def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1, gumbels=None, seed=None):
    """softmax((logits + g) / tau, dim), g = gumbels or the fused op's noise for `seed`.
    hard=True: the one-hot of the argmax of (logits + g) / tau with the soft gradient (straight
    through), like torch.nn.functional.gumbel_softmax: a slice holding NaN comes out all NaN."""
    if gumbels is None:
        gumbels = gumbel_noise(logits.shape, seed, logits.dtype, logits.device)
    z = (logits + gumbels) / tau
    y = torch.softmax(z, dim)
    if not hard:
        return y
    index = z.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(z).scatter_(dim, index, 1.0)
    return y_hard - y.detach() + y


def one_hot_argmax(logits, dim=-1):
    """One-hot of torch.argmax(logits, dim) in logits' dtype."""
    if logits.numel() == 0:
        return torch.zeros_like(logits)
    index = logits.argmax(dim, keepdim=True)
    return torch.zeros_like(logits).scatter_(dim, index, 1.0)


def gumbel_softmax_backward(grad, y, tau, dim):
    """d logits of the soft sample y: y * (grad - sum(grad * y, dim)) / tau."""
    return y * (grad - (grad * y).sum(dim, keepdim=True)) / tau
