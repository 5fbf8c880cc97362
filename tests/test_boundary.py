"""One boundary per op, for both devices (csrc/include/dalle_fast/*_checks.h).

sparse attention: every bad case driven through the shared checks for device types "cpu" and "cuda"
(the _check_sparse_attention* ops on meta tensors, so no GPU is needed), the CPU kernels raising
exactly what the boundary says, the device-specific head-dim limits, and the fake kernels (what
torch.compile and FakeTensorMode run for 'cuda' tensors) raising the same. gumbel_softmax and
logit_laplace: the ops raise ValueError/TypeError naming the argument.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import dalle_fast
from dalle_fast.ops import sparse_attention as sa

KINDS = dalle_fast.ops.sparse_attention.KINDS  # the one definition
DEVICE_TYPES = ("cpu", "cuda")
CHECK = torch.ops.dalle_fast._check_sparse_attention
CHECK_BWD = torch.ops.dalle_fast._check_sparse_attention_backward
CHECK_DEC = torch.ops.dalle_fast._check_sparse_attention_decode


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# T = 2, S = 3: N = 11. Each case: (name, the op's arguments after the tensors are built by `make`,
# exception, message fragment). `make(*shape, dtype=)` builds meta or CPU tensors.
def forward_cases(make):
    q = make(1, 2, 11, 8)
    return [
        ("kind", (q, q, q, "diag", 2, 3, 11, 0.3), ValueError, "kind must be one of"),
        ("text_len", (q, q, q, "row", -1, 3, 11, 0.3), ValueError, "text_len must be >= 0"),
        ("image_size", (q, q, q, "row", 2, 0, 11, 0.3), ValueError, "image_size must be >= 1"),
        ("conv_kernel even", (q, q, q, "conv", 2, 3, 4, 0.3), ValueError, "conv_kernel must be odd"),
        ("conv_kernel on row", (q, q, q, "row", 2, 3, 0, 0.3), ValueError, "conv_kernel must be odd"),
        ("N limit", (q, q, q, "row", 2, 1 << 12, 11, 0.3), ValueError, "below 16777216"),
        ("N overflow", (q, q, q, "row", 2, 1 << 40, 11, 0.3), ValueError, "below 16777216"),
        ("3-D q", (q[0], q[0], q[0], "row", 2, 3, 11, 0.3), ValueError, "q must be 4-D"),
        ("k shape", (q, q[:, :1], q, "row", 2, 3, 11, 0.3), ValueError, "k must have q's shape"),
        ("v shape", (q, q, q[..., :4], "row", 2, 3, 11, 0.3), ValueError, "v must have q's shape"),
        ("N mismatch", (q, q, q, "row", 1, 3, 11, 0.3), ValueError, "q.shape\\[2\\] must equal text_len"),
        ("int dtype", (make(1, 2, 11, 8, dtype=torch.int64),) * 3 + ("row", 2, 3, 11, 0.3), TypeError,
         "q must be a floating tensor"),
        ("fp8 dtype", (make(1, 2, 11, 8, dtype=torch.float8_e4m3fn),) * 3 + ("row", 2, 3, 11, 0.3), TypeError,
         "q must be a floating tensor"),
        ("mixed dtype", (q, make(1, 2, 11, 8, dtype=torch.float64), q, "row", 2, 3, 11, 0.3), TypeError,
         "one dtype"),
        ("head dim 0", (make(1, 2, 11, 0),) * 3 + ("row", 2, 3, 11, 0.3), ValueError, "head dim D"),
        ("head dim 513", (make(1, 1, 11, 513),) * 3 + ("row", 2, 3, 11, 0.3), ValueError, "head dim D"),
        ("nan scale", (q, q, q, "row", 2, 3, 11, float("nan")), ValueError, "scale must be finite"),
        ("inf scale", (q, q, q, "row", 2, 3, 11, float("inf")), ValueError, "scale must be finite"),
    ]


def backward_cases(make):
    q, lse = make(1, 2, 11, 8), make(1, 2, 11)
    bad = [(name, (q,) + args[:3] + (q, lse) + args[3:], exc, match)
           for name, args, exc, match in forward_cases(make) if name not in ("3-D q",)]
    return bad + [
        ("grad_out shape", (q[..., :4], q, q, q, q, lse, "row", 2, 3, 11, 0.3), ValueError, "grad_out must have q's"),
        ("out shape", (q, q, q, q, q[:, :1], lse, "row", 2, 3, 11, 0.3), ValueError, "out must have q's shape"),
        ("out dtype", (q, q, q, q, make(1, 2, 11, 8, dtype=torch.float64), lse, "row", 2, 3, 11, 0.3), TypeError,
         "grad_out and out must have q's dtype"),
        ("lse shape", (q, q, q, q, q, lse[:, :1], "row", 2, 3, 11, 0.3), ValueError, "lse must have shape"),
        ("lse dtype", (q, q, q, q, q, make(1, 2, 11, dtype=torch.int32), "row", 2, 3, 11, 0.3), TypeError,
         "lse must be a floating tensor"),
    ]


def decode_cases(make):
    q, c = make(1, 2, 1, 8), make(1, 2, 11, 8)
    return [
        ("kind", (q, c, c, 3, "diag", 2, 3, 11, 0.3), ValueError, "kind must be one of"),
        ("text_len", (q, c, c, 3, "row", -2, 3, 11, 0.3), ValueError, "text_len must be >= 0"),
        ("image_size", (q, c, c, 3, "row", 2, 0, 11, 0.3), ValueError, "image_size must be >= 1"),
        ("conv_kernel", (q, c, c, 3, "column", 2, 3, -1, 0.3), ValueError, "conv_kernel must be odd"),
        ("N limit", (q, c, c, 3, "row", 2, 1 << 13, 11, 0.3), ValueError, "below 16777216"),
        ("q shape", (c, c, c, 3, "row", 2, 3, 11, 0.3), ValueError, "q must be \\(B, heads, 1, D\\)"),
        ("cache shapes", (q, c, c[:, :, :5], 3, "row", 2, 3, 11, 0.3), ValueError, "one shape"),
        ("cache heads", (q, c[:, :1], c[:, :1], 3, "row", 2, 3, 11, 0.3), ValueError, "batch, heads and head dim"),
        ("int dtype", (make(1, 2, 1, 8, dtype=torch.int32), make(1, 2, 11, 8, dtype=torch.int32),
                       make(1, 2, 11, 8, dtype=torch.int32), 3, "row", 2, 3, 11, 0.3), TypeError, "floating"),
        ("cache dtype", (q, make(1, 2, 11, 8, dtype=torch.float16), c, 3, "row", 2, 3, 11, 0.3), TypeError,
         "one dtype"),
        ("negative position", (q, c, c, -1, "row", 2, 3, 11, 0.3), ValueError, "position must be in \\[0, 11\\)"),
        ("position past N", (q, c, c, 11, "row", 2, 3, 11, 0.3), ValueError, "position must be in \\[0, 11\\)"),
        ("position past cache", (q, c[:, :, :4], c[:, :, :4], 4, "row", 2, 3, 11, 0.3), ValueError,
         "past their end"),
        ("head dim", (make(1, 2, 1, 600), make(1, 2, 11, 600), make(1, 2, 11, 600), 3, "row", 2, 3, 11, 0.3),
         ValueError, "head dim D"),
        ("scale", (q, c, c, 3, "row", 2, 3, 11, float("-inf")), ValueError, "scale must be finite"),
    ]


OPS = {"forward": (forward_cases, CHECK, torch.ops.dalle_fast.sparse_attention),
       "backward": (backward_cases, CHECK_BWD, torch.ops.dalle_fast._sparse_attention_backward),
       "decode": (decode_cases, CHECK_DEC, torch.ops.dalle_fast.sparse_attention_decode)}
CASES = [(op, n, device_type) for op, (cases, _, _) in OPS.items() for n in range(len(cases(meta)))
         for device_type in DEVICE_TYPES]


@pytest.mark.parametrize("op,n,device_type", CASES)
def test_shared_checks_reject_every_bad_case(op, n, device_type):
    cases, check, _ = OPS[op]
    name, args, exc, match = cases(meta)[n]
    with pytest.raises(exc, match=match) as info:
        check(*args, device_type)
    assert type(info.value) is exc, name  # not a subclass: the documented type


@pytest.mark.parametrize("op,n", [(op, n) for op, n, d in CASES if d == "cpu"])
def test_cpu_kernels_raise_exactly_what_the_boundary_says(op, n):
    """The CPU kernel and the check op for "cpu" share one boundary: same type, same message."""
    cases, check, kernel = OPS[op]
    name, args, _, _ = cases(cpu)[n]
    with pytest.raises(Exception) as want:
        check(*args, "cpu")
    with pytest.raises(type(want.value)) as got:
        kernel(*args)
    assert str(got.value) == str(want.value), name


def test_messages_are_the_same_on_both_devices_except_the_device_limits():
    for op, (cases, check, _) in OPS.items():
        for name, args, _, _ in cases(meta):
            msgs = []
            for device_type in DEVICE_TYPES:
                with pytest.raises(Exception) as e:
                    check(*args, device_type)
                msgs.append((type(e.value), str(e.value).replace(device_type, "DEV")))
            if "head dim" not in name:
                assert msgs[0] == msgs[1], (op, name)


def _qkv(D):
    q = meta(1, 2, 11, D, dtype=torch.float16)
    return q, q, q, "conv", 2, 3, 3, 0.1


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_head_dim_limits_are_the_documented_ones(device_type):
    """Every head dim 1..max is accepted, max + 1 is not; the Python mirror says the same."""
    top = sa.MAX_HEAD_DIM[device_type]
    for D in range(1, top + 1):
        CHECK(*_qkv(D), device_type)
        CHECK_DEC(meta(1, 2, 1, D), meta(1, 2, 11, D), meta(1, 2, 11, D), 10, "row", 2, 3, 11, 0.1, device_type)
    with pytest.raises(ValueError, match=f"must be in \\[1, {top}\\] on {device_type}, got {top + 1}"):
        CHECK(*_qkv(top + 1), device_type)


def test_cuda_accepts_the_head_dims_users_bring():
    """The bundled model's 48 and the dims of issue 9 pass the CUDA boundary, in every dtype."""
    for D in (16, 40, 48, 80, 96, 128, 160, 256, 20, 3):
        for dtype in sa.DTYPES:
            q = meta(2, 3, 11, D, dtype=dtype)
            sa.check_arguments("cuda", q, q, q, "row", 2, 3)
            lse = meta(2, 3, 11, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            CHECK_BWD(q, q, q, q, q, lse, "row", 2, 3, 11, 0.2, "cuda")


def test_unknown_device_type_is_a_clear_error():
    with pytest.raises(ValueError, match="device_type must be 'cpu' or 'cuda'"):
        CHECK(*_qkv(8), "tpu")


@given(kind=st.sampled_from(KINDS + ("bogus",)), T=st.integers(-2, 70), S=st.integers(-1, 9), N=st.integers(0, 90),
       D=st.sampled_from([1, 7, 8, 48, 256, 257, 520]), ck=st.integers(-1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]),
       scale=st.sampled_from([0.1, float("nan")]))
def test_property_kernel_boundary_and_fake_kernel_agree(kind, T, S, N, D, ck, dtype, scale):
    """For random arguments: the CPU kernel raises exactly what the "cpu" boundary says (or runs),
    and the fake kernel on FakeTensorMode 'cuda' tensors raises exactly what the "cuda" boundary says
    (or returns the documented shapes)."""
    def outcome(fn):
        try:
            fn()
            return None
        except (ValueError, TypeError) as e:
            return type(e), str(e)

    q = meta(1, 1, N, D, dtype=dtype)
    want_cpu = outcome(lambda: CHECK(q, q, q, kind, T, S, ck, scale, "cpu"))
    want_cuda = outcome(lambda: CHECK(q, q, q, kind, T, S, ck, scale, "cuda"))
    x = torch.zeros(1, 1, N, D, dtype=dtype)
    assert outcome(lambda: torch.ops.dalle_fast.sparse_attention(x, x, x, kind, T, S, ck, scale)) == want_cpu
    with FakeTensorMode():
        y = torch.empty(1, 1, N, D, dtype=dtype, device="cuda")
        got = outcome(lambda: torch.ops.dalle_fast.sparse_attention(y, y, y, kind, T, S, ck, scale))
    assert got == want_cuda


def test_fake_kernels_check_the_cuda_boundary_for_cuda_tensors():
    """Under FakeTensorMode, a 'cuda' call the CUDA kernels would reject fails at trace time with
    their message; a CPU call of the same shape (head dim 300 is fine on the CPU) does not."""
    with FakeTensorMode():
        x = torch.empty(1, 2, 11, 300, device="cuda")
        with pytest.raises(ValueError, match="head dim D .* must be in \\[1, 256\\] on cuda"):
            torch.ops.dalle_fast.sparse_attention(x, x, x, "row", 2, 3, 11, 0.1)
        y = torch.empty(1, 2, 11, 300)
        out, lse = torch.ops.dalle_fast.sparse_attention(y, y, y, "row", 2, 3, 11, 0.1)
        assert out.shape == y.shape and lse.shape == (1, 2, 11)
        x = torch.empty(1, 2, 11, 48, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.ops.dalle_fast.sparse_attention(x, x, x, "row", 2, 3, 11, 0.1)
        assert out.device.type == "cuda" and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="past their end"):
            torch.ops.dalle_fast.sparse_attention_decode(x[:, :, :1], x[:, :, :4], x[:, :, :4], 4, "row", 2, 3, 11, 0.1)
        with pytest.raises(TypeError, match="lse must be a floating tensor"):
            torch.ops.dalle_fast._sparse_attention_backward(x, x, x, x, x, torch.empty(1, 2, 11, dtype=torch.int32,
                                                                                       device="cuda"),
                                                          "row", 2, 3, 11, 0.1)


def test_check_ops_pass_opcheck():
    q = torch.randn(1, 2, 11, 8)
    for device_type in DEVICE_TYPES:
        torch.library.opcheck(CHECK, (q, q, q, "row", 2, 3, 11, 0.3, device_type))
        torch.library.opcheck(CHECK_DEC, (q[:, :, :1], q, q, 4, "row", 2, 3, 11, 0.3, device_type))
        torch.library.opcheck(CHECK_BWD, (q, q, q, q, q, q[..., 0], "row", 2, 3, 11, 0.3, device_type))


# ---------------------------------------------------------------- the other ops' boundaries
def test_gumbel_softmax_op_raises_value_and_type_errors():
    ops = torch.ops.dalle_fast
    x, s = torch.randn(3, 4), torch.zeros(1, dtype=torch.int64)
    cases = [
        (lambda: ops.gumbel_softmax(torch.ones(3, dtype=torch.int64), s, None, 1.0, 0), TypeError, "logits must be"),
        (lambda: ops.gumbel_softmax(x, s, None, 0.0, 0), ValueError, "tau must be"),
        (lambda: ops.gumbel_softmax(x, s, torch.randn(2), 1.0, 0), ValueError, "gumbels must have logits' shape"),
        (lambda: ops.gumbel_softmax(x, s, x.double(), 1.0, 0), TypeError, "gumbels must have logits' dtype"),
        (lambda: ops.gumbel_softmax(x, torch.zeros(2, dtype=torch.int64), None, 1.0, 0), ValueError, "one-element"),
        (lambda: ops.gumbel_softmax(x, torch.zeros(1), None, 1.0, 0), TypeError, "seed must be"),
        (lambda: ops.gumbel_softmax_hard(x, s, None, float("nan"), 0, True), ValueError, "tau must be"),
        (lambda: ops.one_hot_argmax(torch.ones(3, dtype=torch.int32), 0), TypeError, "logits must be"),
        (lambda: ops.one_hot_argmax(x, 2), IndexError, "out of range"),
        (lambda: ops._gumbel_softmax_backward(torch.randn(2), x, 1.0, 0), ValueError, "grad and y must match"),
        (lambda: ops._gumbel_softmax_backward(x.double(), x, 1.0, 0), TypeError, "grad and y must match in dtype"),
        (lambda: ops._gumbel_softmax_backward(x, x, -1.0, 0), ValueError, "tau must be"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match) as info:
            call()
        assert type(info.value) is exc, match


def test_logit_laplace_op_raises_value_and_type_errors():
    ops = torch.ops.dalle_fast
    x, stats = torch.rand(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    cases = [
        (lambda: ops.logit_laplace_loss(x, stats[:, :5], 0.1, "mean"), ValueError, "stats must be \\(B, 2C, H, W\\)"),
        (lambda: ops.logit_laplace_loss(x[0], stats[0], 0.1, "mean"), ValueError, "x must be \\(B, C, H, W\\)"),
        (lambda: ops.logit_laplace_loss(x.long(), stats.long(), 0.1, "mean"), TypeError, "floating"),
        (lambda: ops.logit_laplace_loss(x, stats.double(), 0.1, "mean"), TypeError, "stats must have x's dtype"),
        (lambda: ops.logit_laplace_loss(x, stats, 0.5, "mean"), ValueError, "eps must be in"),
        (lambda: ops.logit_laplace_loss(x, stats, 0.1, "avg"), ValueError, "reduction must be"),
        (lambda: ops.logit_laplace_loss(x + 1, stats, 0.1, "sum"), ValueError, "x must lie in \\[0, 1\\]"),
        (lambda: ops._logit_laplace_loss_backward(torch.ones(3), x, stats, 0.1, "none", False), ValueError,
         "grad must have x's shape"),
        (lambda: ops._logit_laplace_loss_backward(torch.ones(3), x, stats, 0.1, "mean", False), ValueError,
         "grad must be a scalar"),
        (lambda: ops._logit_laplace_loss_backward(torch.ones((), dtype=torch.int64), x, stats, 0.1, "mean", False),
         TypeError, "grad must be a floating"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match) as info:
            call()
        assert type(info.value) is exc, match
