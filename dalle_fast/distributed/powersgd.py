"""PowerSGD gradient compression with the DALL-E paper's choices (Appendix E), as a DDP communication
hook (`ddp.register_comm_hook(state, powersgd_hook)`) and as a function over any list of local
gradients (FSDP2's local shards across the replicate dimension: `state.allreduce_(params, grads)`).

Per compressed matrix M (the gradient added into its error buffer, transposed so rows >= cols):
    P = M Q                      Q (cols, r): a fixed random Gaussian for the whole run (warm start optional)
    all-reduce P (mean)          in comm_dtype (16-bit by default, as the paper)
    P <- householder_qr(P + eps I)   batched over matrices of the same shape (dalle_fast.ops.householder_qr)
    Q' = M^T P, all-reduce Q' (mean)
    D = P Q'^T in fp32           the update every rank applies
    E <- M - D                   error buffer in error_dtype, infinities clamped to the format's max keeping sign
Embeddings, unembeddings, gains and biases (every parameter not in `compress`) go uncompressed in one fp32
all-reduce, which also carries a count of non-finite local gradient values. A non-finite gradient, P or Q'
skips the whole update: nothing is added to the error buffers (a non-finite buffer is reset to zero), the
gradients are left as they were, and `state.pop_skipped()` returns True, so the caller skips the
optimizer step on every rank (the decision is collective). Collectives per call: 3, whatever the number
of matrices.

With several DDP buckets a skip is decided per bucket; buckets reduced before the one that skips have
already committed their error buffers (use one bucket, or the allreduce_ form, for an all-or-nothing skip).
"""
import math

import torch
import torch.distributed as dist

from ..ops.householder_qr import householder_qr

_BUFFER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def paper_compression_rate(rank, d_model):
    """The paper's estimate of the fraction of gradient traffic saved: 1 - 5 r / (8 d_model)."""
    return 1.0 - 5.0 * rank / (8.0 * d_model)


def compressible_parameters(model):
    """The matrices the paper compresses: the weights of the linear layers inside the residual branches
    (model.resblocks() where the model has it, else every nn.Linear), never embeddings, unembeddings,
    gains or biases."""
    roots = list(model.resblocks()) if hasattr(model, "resblocks") else [model]
    out = []
    for root in roots:
        for m in root.modules():
            if isinstance(m, torch.nn.Linear):
                out.append(m.weight)
    return out


def _clamp_to(x, dtype, parts=1):
    """x cast to dtype with +-inf (and overflow) clamped to the format's largest finite value / parts, sign
    kept (parts = world size for a term of a sum over the group, which then cannot overflow)."""
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max / parts
        x = x.clamp(-big, big)  # NaN stays NaN
    return x.to(dtype)


class PowerSGDState:
    """State of the PowerSGD compressor of one process group.

    process_group: the group the gradients are averaged over (None: the default group).
    matrix_approximation_rank: r (>= 1), the same on every rank (checked collectively at construction).
    compress: the parameters to compress (matrices only); None = every 2-D parameter. Use
        compressible_parameters(model) for the paper's choice.
    eps: added to P's diagonal before the QR (the paper: 1e-6).
    error_dtype: dtype of the error buffers (the paper: 16-bit); comm_dtype: of P and Q' in the
        all-reduces (default error_dtype, fp32 for fp64 buffers).
    warm_start: reuse the last Q' as the next Q instead of the fixed random one.
    min_compression_rate: a matrix is compressed only when m n / (r (m + n)) >= this (1.0: whenever it saves
        traffic); 0 compresses every listed matrix, even at full rank.
    """

    def __init__(self, process_group=None, matrix_approximation_rank=1, *, compress=None, eps=1e-6,
                 error_dtype=torch.float16, comm_dtype=None, warm_start=False, seed=0, min_compression_rate=1.0,
                 check_ranks=True):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("PowerSGDState: process_group: torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        r = matrix_approximation_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"PowerSGDState: matrix_approximation_rank must be an int >= 1, got {r!r}")
        if error_dtype not in _BUFFER_DTYPES:
            raise TypeError(f"PowerSGDState: error_dtype must be one of {_BUFFER_DTYPES}, got {error_dtype}")
        if comm_dtype is None:
            comm_dtype = torch.float32 if error_dtype == torch.float64 else error_dtype
        if comm_dtype not in _BUFFER_DTYPES:
            raise TypeError(f"PowerSGDState: comm_dtype must be one of {_BUFFER_DTYPES}, got {comm_dtype}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"PowerSGDState: eps must be finite and >= 0, got {eps}")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank, self.eps, self.error_dtype, self.comm_dtype = r, float(eps), error_dtype, comm_dtype
        self.compute_dtype = torch.float64 if error_dtype == torch.float64 else torch.float32
        self.warm_start, self.seed, self.min_compression_rate = warm_start, seed, min_compression_rate
        self.compress_ids = None
        self.order = {}  # id(param) -> index: the key of its buffers in state_dict()
        if compress is not None:
            compress = list(compress)
            for i, p in enumerate(compress):
                if not isinstance(p, torch.Tensor) or p.dim() != 2:
                    shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                    raise ValueError(f"PowerSGDState: compress[{i}] must be a matrix (2-D parameter), got {shape}")
            self.compress_ids = {id(p) for p in compress}
            self.order = {id(p): i for i, p in enumerate(compress)}
        self.errors, self.qs = {}, {}
        self._skipped = False
        self.steps = self.skipped_steps = 0
        self.elements_dense = self.elements_sent = self.bytes_sent = 0  # cumulative
        if check_ranks:
            self._check_agreement()

    def _check_agreement(self):
        n = len(self.order)
        mine = torch.tensor([self.rank, -self.rank, n, -n], dtype=torch.float64)
        both = mine.clone()
        from .launch import guard_collectives
        with guard_collectives("PowerSGDState's agreement check (every process must build a PowerSGDState: "
                               "is a rank running without the hook?)"):
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        if both[0] != -both[1]:
            raise ValueError(f"PowerSGDState: matrix_approximation_rank differs across processes "
                             f"(between {int(-both[1])} and {int(both[0])}); this process has {self.rank}")
        if both[2] != -both[3]:
            raise ValueError(f"PowerSGDState: compress lists {n} matrices here but another process lists a "
                             f"different number ({int(-both[3])} to {int(both[2])})")

    # ---- bookkeeping ----
    def pop_skipped(self):
        """True when the update since the last call was skipped (non-finite values); resets the flag."""
        s, self._skipped = self._skipped, False
        return s

    def compression_rate(self):
        """Measured fraction of gradient elements not sent: 1 - sent / dense, over every call so far."""
        return 1.0 - self.elements_sent / self.elements_dense if self.elements_dense else 0.0

    def state_dict(self):
        """Error buffers (and warm-start Qs) keyed by the parameter's index in `compress`: for exact resume."""
        out = {f"error.{k}": v for k, v in self.errors.items()}
        if self.warm_start:
            out.update({f"q.{k}": v for k, v in self.qs.items()})
        return out

    def load_state_dict(self, tensors):
        for name, v in tensors.items():
            kind, key = name.split(".", 1)
            if kind not in ("error", "q"):
                raise ValueError(f"PowerSGDState.load_state_dict: unknown entry {name!r}")
            (self.errors if kind == "error" else self.qs)[int(key) if key.isdigit() else key] = v.clone()

    # ---- the compressor ----
    def _key(self, p):
        # first-seen order when no compress list was given: the same on every rank (same model, same buckets),
        # so the fixed random Q (seeded by the key) is the same everywhere
        return self.order.setdefault(id(p), len(self.order))

    def _compressed(self, p, g):
        if self.compress_ids is not None:
            if id(p) not in self.compress_ids:
                return False
        elif g.dim() != 2:
            return False
        if g.dim() != 2:
            raise ValueError(f"PowerSGDState: a parameter marked for compression has a {g.dim()}-D gradient "
                             f"{tuple(g.shape)}; only matrices can be compressed")
        m, n = max(g.shape), min(g.shape)
        r = min(self.rank, n)
        return r > 0 and m * n >= self.min_compression_rate * r * (m + n)

    def _random_q(self, key, n, r, device):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return torch.randn(n, r, generator=g, dtype=self.compute_dtype).to(device)

    def _allreduce_mean(self, flat, dtype=None, prescaled=False):
        """Mean over the group; prescaled: flat was already divided by the world size (16-bit P and Q are,
        so that their sum cannot overflow where the mean would not)."""
        self.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=self.process_group)
        flat = flat.to(dtype or self.compute_dtype)
        return flat if prescaled else flat / self.world_size

    @torch.no_grad()
    def allreduce_(self, params, grads):
        """Averages `grads` (local gradients, one per parameter of `params`) over the process group in
        place: compressed matrices get the PowerSGD update, the rest the exact mean. Returns True when
        the update was skipped (then the grads are untouched; see pop_skipped)."""
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"allreduce_: params and grads differ in length ({len(params)} vs {len(grads)})")
        comp = [(p, g) for p, g in zip(params, grads) if self._compressed(p, g)]
        comp_ids = {id(g) for _, g in comp}
        plain = [g for g in grads if id(g) not in comp_ids]
        self.steps += 1
        device = grads[0].device if grads else torch.device("cpu")
        bad = sum(int((~torch.isfinite(g)).sum()) for g in grads if g.is_floating_point())
        wide = torch.float64 if any(g.dtype == torch.float64 for g in plain) else torch.float32  # fp32, fp64 for fp64
        flat = torch.cat([g.reshape(-1).to(wide) for g in plain] +
                         [torch.tensor([float(bad)], dtype=wide, device=device)])
        self.elements_dense += sum(g.numel() for g in grads)
        self.elements_sent += flat.numel() - 1
        flat = self._allreduce_mean(flat, wide)
        if flat[-1] > 0:
            return self._skip(comp)
        off = 0
        for g in plain:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        if comp:
            return self._compress_(comp)
        return False

    def _skip(self, comp):
        self._skipped = True
        self.skipped_steps += 1
        for p, _ in comp:
            e = self.errors.get(self._key(p))
            if e is not None and not torch.isfinite(e).all():
                e.zero_()
        return True

    def _compress_(self, comp):
        cd = self.compute_dtype
        groups = {}  # (m, n, r) -> [(param, grad, transposed)]
        for p, g in comp:
            t = g.shape[0] < g.shape[1]
            m, n = (g.shape[1], g.shape[0]) if t else tuple(g.shape)
            groups.setdefault((m, n, min(self.rank, n)), []).append((p, g, t))
        mats, ps = {}, []
        for shape, items in groups.items():
            m, n, r = shape
            M = torch.stack([self._error(p, g, t).to(cd) + (g.t() if t else g).to(cd) for p, g, t in items])
            M = _clamp_to(M, self.error_dtype).to(cd)  # what the 16-bit buffer holds
            Q = torch.stack([self._q(p, n, r, g.device) for p, g, _ in items])
            mats[shape] = M
            ps.append(torch.bmm(M, Q))
        # all-reduce every P in one collective, in comm_dtype
        flat = torch.cat([_clamp_to(P / self.world_size, self.comm_dtype, self.world_size).reshape(-1) for P in ps])
        self.elements_sent += flat.numel()
        P_all = self._allreduce_mean(flat, prescaled=True)
        if not torch.isfinite(P_all).all():
            return self._skip(comp)
        qs, off, hats = [], 0, {}
        for (shape, M), P in zip(mats.items(), ps):
            Phat = householder_qr(P_all[off:off + P.numel()].view_as(P), self.eps)
            off += P.numel()
            hats[shape] = Phat
            qs.append(torch.bmm(M.transpose(1, 2), Phat))
        flat = torch.cat([_clamp_to(Qn / self.world_size, self.comm_dtype, self.world_size).reshape(-1) for Qn in qs])
        self.elements_sent += flat.numel()
        Q_all = self._allreduce_mean(flat, prescaled=True)
        if not torch.isfinite(Q_all).all():
            return self._skip(comp)
        off = 0
        for (shape, items), Qn in zip(groups.items(), qs):
            Qn = Q_all[off:off + Qn.numel()].view_as(Qn)
            off += Qn.numel()
            D = torch.bmm(hats[shape], Qn.transpose(1, 2))  # decompressed, in fp32 (fp64)
            E = _clamp_to(mats[shape] - D, self.error_dtype)
            for i, (p, g, t) in enumerate(items):
                key = self._key(p)
                self.errors[key] = E[i].clone()
                if self.warm_start:
                    self.qs[key] = Qn[i].clone()
                g.copy_((D[i].t() if t else D[i]).to(g.dtype))
        return False

    def _error(self, p, g, t):
        key = self._key(p)
        shape = (g.shape[1], g.shape[0]) if t else tuple(g.shape)
        e = self.errors.get(key)
        if e is None or tuple(e.shape) != shape:
            e = self.errors[key] = torch.zeros(shape, dtype=self.error_dtype, device=g.device)
        elif not torch.isfinite(e).all():
            e.zero_()
        return e

    def _q(self, p, n, r, device):
        key = self._key(p)
        q = self.qs.get(key)
        if q is None or tuple(q.shape) != (n, r):
            q = self._random_q(key, n, r, device)
            if self.warm_start:
                self.qs[key] = q
        return q.to(device=device, dtype=self.compute_dtype)


def powersgd_hook(state, bucket):
    """DDP communication hook: `ddp_model.register_comm_hook(state, powersgd_hook)`. Averages the bucket's
    gradients with state.allreduce_ and returns the bucket's buffer (its gradients are views of it)."""
    if not isinstance(state, PowerSGDState):
        raise TypeError(f"powersgd_hook: state must be a PowerSGDState, got {type(state).__name__}")
    grads = bucket.gradients()
    state.allreduce_(bucket.parameters(), grads)
    buf = bucket.buffer()
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut
