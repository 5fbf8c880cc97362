"""The FakeTensorMode pass: the CUDA tests' bodies on a machine without a GPU.

`pytest --fake-cuda tests/...` (the option lives in conftest.py) makes dalle_fast.testing.cuda_available()
true, keeps only the CUDA tests (a 'cuda' parameter, the `gpu` fixture, or a skip mark that names CUDA)
and runs each one under torch's FakeTensorMode, so every tensor it makes on 'cuda' is a fake one: the
Python wrappers, the fake kernels and the module code see device 'cuda' and must run through (shape,
dtype and device logic, argument checks). Values do not exist there: each read of one (.item(), bool(),
torch.equal) is answered with a neutral value (0, True), so the tests' numeric assertions pass
vacuously and only the code paths are checked. tests/test_cuda_fake.py runs this pass in CI.
"""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


class AnswerValueReads(TorchDispatchMode):
    """Above FakeTensorMode: a read of a value gets a neutral answer instead of an error."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 0.0 if t.is_floating_point() else 0
        if func in (torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default):
            return True
        return func(*args, **kwargs)


class _FakeCudaGenerator:
    """torch.Generator('cuda') needs a driver; fake tensors draw nothing, so a CPU generator stands in."""

    def __new__(cls, device="cpu"):
        return _REAL_GENERATOR("cpu" if str(device).startswith("cuda") else device)


_REAL_GENERATOR = torch.Generator


def _leaves(roots):
    """The leaf tensors (AccumulateGrad nodes) an autograd graph reaches from `roots`."""
    seen, stack, out = set(), [r for r in roots if r is not None], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            out.append(node.variable)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return out


def _fake_grad(outputs, inputs, grad_outputs=None, *args, **kwargs):
    """torch.autograd.grad stand-in: the engine needs a CUDA context even for fake 'cuda' tensors, so the
    backward itself is not run in this pass (its formulas run in the CPU tests); fake zero gradients of
    each input's shape, dtype and device keep the test's code going."""
    single = isinstance(inputs, torch.Tensor)
    inputs = (inputs,) if single else tuple(inputs)
    return tuple(torch.zeros_like(t) for t in inputs)


def _fake_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    for leaf in (list(inputs) if inputs is not None else _leaves([self.grad_fn])):
        leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


def _fake_module_apply(self, fn, recurse=True):
    """nn.Module._apply for fake parameters: new Parameters instead of swapping tensors (swapping fails
    on the weak references the fake mode keeps)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, p in self._parameters.items():
        if p is not None:
            with torch.no_grad():
                self._parameters[key] = torch.nn.Parameter(fn(p), p.requires_grad)
    for key, b in self._buffers.items():
        if b is not None:
            self._buffers[key] = fn(b)
    return self


def _fake_gradcheck(func, inputs, *args, **kwargs):
    """gradcheck compares numbers; on fake tensors the function is run once and the check passes."""
    func(*((inputs,) if isinstance(inputs, torch.Tensor) else inputs))
    return True


class _Lenient:
    """pytest.raises stand-in: kernels' value checks cannot fire on fake tensors, so a call that raises
    nothing passes; one that raises must still raise the expected type."""

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        self.ctx = self.real.__enter__()
        return self.ctx

    def __exit__(self, typ, value, tb):
        if typ is None:
            return True  # nothing raised: the check needs values
        return self.real.__exit__(typ, value, tb)


@contextlib.contextmanager
def fake_cuda():
    """Tensors made inside are fake (any device, 'cuda' included); value reads answer neutrally."""
    patches = [(torch, "Generator", _FakeCudaGenerator), (torch.autograd, "grad", _fake_grad),
               (torch.Tensor, "backward", _fake_backward), (torch.nn.Module, "_apply", _fake_module_apply),
               (torch.autograd, "gradcheck", _fake_gradcheck), (torch.autograd, "gradgradcheck", _fake_gradcheck),
               (pytest, "raises", lambda *a, **k: _Lenient(_REAL_RAISES(*a, **k)))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), AnswerValueReads():
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


_REAL_RAISES = pytest.raises


def install():
    """Before collection: the CUDA tests' skip conditions see a CUDA device."""
    import dalle_fast.testing
    dalle_fast.testing.cuda_available = lambda: True


def is_cuda_test(item):
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(str(v) == "cuda" for v in callspec.params.values()):
        return True
    if "gpu" in getattr(item, "fixturenames", ()):
        return True
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def select(config, items, every_case=False):
    """Keeps the CUDA tests: every case with every_case, else one case per test function and dtype (the
    code paths differ by dtype, not by shape or kind: each body still runs)."""
    keep, seen = [], set()
    for item in items:
        if not is_cuda_test(item):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        key = (item.module.__name__, item.originalname, str(params.get("dtype")))
        if every_case or key not in seen:
            keep.append(item)
            seen.add(key)
    drop = [i for i in items if i not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with fake_cuda():
        yield
