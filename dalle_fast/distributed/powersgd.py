"""PowerSGD gradient compression with the DALL-E paper's choices (Appendix E), as a DDP communication
hook (`ddp.register_comm_hook(state, powersgd_hook)`) and as a function over any list of local
gradients (FSDP2's local shards across the replicate dimension: `state.allreduce_(params, grads)`).

Per compressed matrix G (in its own layout; for a wide one the math below runs on the transposed view,
so rows >= cols, without copying):
    M = G + E                    E: the error buffer (error_dtype, 16-bit by default)
    P = M Q                      Q (cols, r): a fixed random Gaussian for the whole run (warm start optional)
    all-reduce P (mean)          in comm_dtype (16-bit by default, as the paper)
    P <- householder_qr(P + eps I)   batched over matrices of the same shape (dalle_fast.ops.householder_qr)
    Q' = M^T P, all-reduce Q' (mean)
    D = P Q'^T in fp32           the update every rank applies (written straight into the gradient)
    E <- M - D                   (D as stored in the gradient's dtype), infinities clamped to the format's max
Matrices of one shape are stacked once into a persistent fp32 workspace and their error buffers live in one
stacked tensor, so every product, the QR and the error update is one call per shape, not per matrix.
Embeddings, unembeddings, gains and biases (every parameter not in `compress`) go uncompressed in one fp32
all-reduce. A non-finite value in any gradient shows up in that all-reduce or in P (NaN and Inf propagate
through M Q), on every rank at once: the whole update is skipped: nothing is added to the error buffers (a
non-finite buffer is reset to zero), the gradients are left as they were, and `state.pop_skipped()` returns
True, so the caller skips the optimizer step on every rank (the decision is collective). Collectives per
call: at most 3, whatever the number of matrices.

With several DDP buckets the skip covers the whole step: new error buffers are committed only after the
last bucket (GradBucket.is_last()), and a bucket that skips makes the remaining buckets of the step skip
too (without collectives: every rank knows), so nothing is added to any buffer.
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


class _Group:
    """The matrices of one shape in one call: their error buffers stacked (b, rows, cols) in error_dtype,
    their Qs (b, n, r) and an fp32 (fp64) workspace for M = G + E, kept from step to step."""

    def __init__(self, keys, rows, cols, r, error_dtype, compute_dtype, device):
        self.keys, self.rows, self.cols, self.r = keys, rows, cols, r
        self.wide = rows < cols  # the math runs on the transposed view
        b = len(keys)
        self.E = torch.zeros(b, rows, cols, dtype=error_dtype, device=device)
        self.M = torch.empty(b, rows, cols, dtype=compute_dtype, device=device)
        self.Q = None
        self.q_new = None  # warm start: the Q' of a pending update

    def tall(self, x):
        """x (b, rows, cols) as (b, m, n) with m >= n (a view)."""
        return x.transpose(1, 2) if self.wide else x


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
        self._plans = {}  # the parameters of one call (a DDP bucket) -> (compressed indices by group, plain indices)
        self._where = {}  # key -> (group, index in it): where each matrix's buffers live now
        self._loaded = {}  # state loaded before the matrix was first seen: ("error" | "q", key) -> tensor
        self._pending, self._pending_plain = [], []  # groups and plain gradients of this step, not yet committed
        self._step_skipped = False
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

    @property
    def errors(self):
        """{key: error buffer} (views into the stacked buffers; the key is the index in `compress`)."""
        out = {k: v for (kind, k), v in self._loaded.items() if kind == "error"}
        out.update({k: grp.E[i] for k, (grp, i) in self._where.items()})
        return out

    @property
    def qs(self):
        """{key: Q} of the warm-started matrices (empty without warm_start)."""
        if not self.warm_start:
            return {}
        out = {k: v for (kind, k), v in self._loaded.items() if kind == "q"}
        out.update({k: grp.Q[i] for k, (grp, i) in self._where.items() if grp.Q is not None})
        return out

    def state_dict(self):
        """Error buffers (and warm-start Qs) keyed by the parameter's index in `compress`, each in the
        gradient's own layout: for exact resume (tensors: safetensors-ready)."""
        out = {f"error.{k}": v.clone() for k, v in self.errors.items()}
        out.update({f"q.{k}": v.clone() for k, v in self.qs.items()})
        return out

    def load_state_dict(self, tensors):
        """Loads what state_dict() returned (into live buffers now, or when the matrix is first seen);
        an unknown entry or a buffer of another shape raises ValueError naming it, before anything changes."""
        parsed = []
        for name, v in tensors.items():
            kind, _, key = name.partition(".")
            if kind not in ("error", "q") or not key:
                raise ValueError(f"PowerSGDState.load_state_dict: unknown entry {name!r}")
            key = int(key) if key.isdigit() else key
            live = self._where.get(key)
            if live is not None:
                grp, i = live
                want = tuple(grp.E.shape[1:]) if kind == "error" else (min(grp.rows, grp.cols), grp.r)
                if tuple(v.shape) != want:
                    raise ValueError(f"PowerSGDState.load_state_dict: {name!r} has shape {tuple(v.shape)}, the "
                                     f"matrix it belongs to needs {want}")
            parsed.append((kind, key, v))
        for kind, key, v in parsed:
            live = self._where.get(key)
            if live is None:
                self._loaded[(kind, key)] = v.clone()
                continue
            grp, i = live
            if kind == "error":
                grp.E[i].copy_(v)
            elif grp.Q is not None:
                grp.Q[i].copy_(v)

    # ---- the plan of one call ----
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

    def _plan(self, params, grads):
        """Built once per distinct parameter list (a DDP bucket, FSDP's shards): the plain gradients and the
        same-shape groups of compressed ones, with their persistent buffers."""
        sig = tuple((id(p), tuple(g.shape), g.device) for p, g in zip(params, grads))
        plan = self._plans.get(sig)
        if plan is not None:
            return plan
        by_shape, plain = {}, []
        for i, (p, g) in enumerate(zip(params, grads)):
            if self._compressed(p, g):
                by_shape.setdefault(tuple(g.shape), []).append(i)
            else:
                plain.append(i)
        groups = []
        for (rows, cols), idx in by_shape.items():
            keys = [self._key(params[i]) for i in idx]
            n = min(rows, cols)
            grp = _Group(keys, rows, cols, min(self.rank, n), self.error_dtype, self.compute_dtype, grads[idx[0]].device)
            qs = []
            for j, key in enumerate(keys):
                old = self._where.get(key)  # DDP rebuilt its buckets: the buffers move to the new group
                err = old[0].E[old[1]] if old else self._loaded.pop(("error", key), None)
                if err is not None:
                    if tuple(err.shape) != (rows, cols):
                        raise ValueError(f"PowerSGDState: the error buffer of matrix {key} has shape "
                                         f"{tuple(err.shape)}, its gradient {(rows, cols)}")
                    grp.E[j].copy_(err)
                q = (old[0].Q[old[1]] if old and old[0].Q is not None else self._loaded.pop(("q", key), None)) \
                    if self.warm_start else None
                qs.append(q if q is not None else self._random_q(key, n, grp.r, grp.E.device))
            grp.Q = torch.stack([q.to(device=grp.E.device, dtype=self.compute_dtype) for q in qs])
            for j, key in enumerate(keys):
                self._where[key] = (grp, j)
            groups.append((grp, idx))
        # plans whose buffers moved to this one (DDP's bucket rebuild after its first step) are dropped
        self._plans = {k: v for k, v in self._plans.items()
                       if all(self._where[key][0] is grp for grp, _ in v[0] for key in grp.keys)}
        plan = self._plans[sig] = (groups, plain)
        return plan

    # ---- the compressor ----
    def _allreduce(self, flat, prescaled):
        """Mean over the group, in compute_dtype; prescaled: flat was already divided by the world size
        (16-bit P and Q are, so that their sum cannot overflow where the mean would not)."""
        self.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=self.process_group)
        flat = flat.to(self.compute_dtype) if flat.dtype != self.compute_dtype else flat
        return flat if prescaled else flat.div_(self.world_size)

    def _pack(self, mats):
        """The small P or Q' matrices of every group in one flat buffer in comm_dtype, divided by the world size."""
        flat = torch.cat([x.reshape(-1) for x in mats]).div_(self.world_size)
        return _clamp_to(flat, self.comm_dtype, self.world_size) if flat.dtype != self.comm_dtype else flat

    @torch.no_grad()
    def allreduce_(self, params, grads, last=True):
        """Averages `grads` (local gradients, one per parameter of `params`) over the process group in
        place: compressed matrices get the PowerSGD update, the rest the exact mean. Returns True when
        the update was skipped (then the grads are untouched; see pop_skipped). last=False: more calls
        (DDP buckets) follow in this step: the error buffers are committed, or the step skipped, after the
        call with last=True."""
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"allreduce_: params and grads differ in length ({len(params)} vs {len(grads)})")
        self.steps += 1
        if not self._step_skipped:
            self._step_skipped = self._reduce(params, grads)
        skipped = self._step_skipped
        if last:
            self._finish_step()
        return skipped

    def _reduce(self, params, grads):
        groups, plain = self._plan(params, grads)
        self.elements_dense += sum(g.numel() for g in grads)
        flat = None
        if plain:
            wide = torch.float64 if any(grads[i].dtype == torch.float64 for i in plain) else torch.float32
            flat = torch.cat([grads[i].reshape(-1).to(wide) for i in plain])
            self.elements_sent += flat.numel()
            self.bytes_sent += flat.numel() * flat.element_size()
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)
            if not torch.isfinite(flat).all():
                return True
        if groups:
            if not self._compress(groups, grads):
                return True
        if flat is not None:
            self._pending_plain.append((flat, [grads[i] for i in plain]))
        return False

    def _compress(self, groups, grads):
        """The PowerSGD round of every group; False (nothing written anywhere) when P or Q' is non-finite."""
        ps = []
        for grp, idx in groups:
            torch._foreach_copy_(list(grp.M.unbind(0)), [grads[i] for i in idx])
            grp.M.add_(grp.E)
            ps.append(torch.bmm(grp.tall(grp.M), grp.Q))
        flat = self._pack(ps)
        self.elements_sent += flat.numel()
        P_all = self._allreduce(flat, prescaled=True)
        if not torch.isfinite(P_all).all():
            return False
        hats, qs, off = [], [], 0
        for (grp, _), P in zip(groups, ps):
            Phat = householder_qr(P_all[off:off + P.numel()].view_as(P), self.eps)
            off += P.numel()
            hats.append(Phat)
            qs.append(torch.bmm(grp.tall(grp.M).transpose(1, 2), Phat))
        flat = self._pack(qs)
        self.elements_sent += flat.numel()
        Q_all = self._allreduce(flat, prescaled=True)
        if not torch.isfinite(Q_all).all():
            return False
        off = 0
        for (grp, idx), Phat, Qn in zip(groups, hats, qs):
            Qn = Q_all[off:off + Qn.numel()].view_as(Qn)
            off += Qn.numel()
            # D (in the gradient's layout) straight into each gradient, then M <- M - D as the gradient holds it
            a, b = (Qn, Phat) if grp.wide else (Phat, Qn)
            gs = [grads[i] for i in idx]
            for j, g in enumerate(gs):
                if g.dtype == grp.M.dtype and g.is_contiguous():
                    torch.mm(a[j], b[j].t(), out=g)
                else:
                    g.copy_(a[j] @ b[j].t())
            torch._foreach_sub_(list(grp.M.unbind(0)), gs)
            grp.q_new = Qn if self.warm_start else None
            self._pending.append(grp)
        return True

    def _finish_step(self):
        """Commits the step's error buffers (and plain means), or throws them away when it skipped."""
        if self._step_skipped:
            self._skipped = True
            self.skipped_steps += 1
            for grp, _ in self._where.values():
                if not torch.isfinite(grp.E).all():
                    grp.E.zero_()
        else:
            for grp in self._pending:
                if grp.E.dtype == grp.M.dtype:
                    grp.E, grp.M = grp.M, grp.E  # the workspace becomes the buffer: no copy
                else:
                    if grp.E.dtype in (torch.float16, torch.bfloat16):
                        big = torch.finfo(grp.E.dtype).max
                        grp.M.clamp_(-big, big)  # the workspace is free now: clamp in place, NaN stays NaN
                    grp.E.copy_(grp.M)
                if grp.q_new is not None:
                    grp.Q.copy_(grp.q_new)
            for flat, gs in self._pending_plain:
                torch._foreach_copy_(gs, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in gs]), gs)])
        for grp in self._pending:
            grp.q_new = None
        self._pending, self._pending_plain, self._step_skipped = [], [], False


def powersgd_hook(state, bucket):
    """DDP communication hook: `ddp_model.register_comm_hook(state, powersgd_hook)`. Averages the bucket's
    gradients with state.allreduce_ and returns the bucket's buffer (its gradients are views of it)."""
    if not isinstance(state, PowerSGDState):
        raise TypeError(f"powersgd_hook: state must be a PowerSGDState, got {type(state).__name__}")
    grads = bucket.gradients()
    state.allreduce_(bucket.parameters(), grads, last=bucket.is_last())
    buf = bucket.buffer()
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut
