"""The package's layering: ops/ never imports models/, importing dalle_fast alone registers a fake
kernel for every op of the library, and the mask kinds are defined once."""
import ast
import json
import os
import subprocess
import sys

import dalle_fast
from dalle_fast.models import dalle as dalle_model
from dalle_fast.nn import attention as nn_attention
from dalle_fast.ops import sparse_attention as ops_sparse_attention
from dalle_fast.reference import sparse_attention as ref_sparse_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dalle_fast")

# run in a fresh interpreter that imports nothing but dalle_fast
FRESH = r"""
import json, sys, torch
import dalle_fast
from torch._library.simple_registry import singleton
ops = sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("dalle_fast::"))
def has_fake(name):
    if singleton.find(name).fake_impl.kernel is not None:
        return "register_fake"
    for key in ("Meta", "CompositeImplicitAutograd"):
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            return key
    return None
print(json.dumps({"ops": {n: has_fake(n) for n in ops},
                  "modules": sorted(m for m in sys.modules if m.startswith("dalle_fast"))}))
"""


def _fresh_import():
    r = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_importing_dalle_fast_alone_registers_a_fake_kernel_for_every_op():
    got = _fresh_import()
    ops = got["ops"]
    # the library's ops as ops.cpp defines them, not a list kept by hand here
    defined = set()
    for line in open(os.path.join(ROOT, "csrc", "ops.cpp")):
        if 'm.def("' in line:
            defined.add("dalle_fast::" + line.split('m.def("', 1)[1].split("(", 1)[0])
    assert defined and defined == set(ops), (defined ^ set(ops))
    assert "dalle_fast::transformer_decode_step" in ops
    missing = sorted(n for n, how in ops.items() if how is None)
    assert not missing, f"ops without a fake kernel after `import dalle_fast`: {missing}"
    # every op that takes or returns a tensor has a real fake kernel, not only a composite
    tensor_ops = {n for n in ops if "Tensor" in str(torch_schema(n))}
    assert all(ops[n] in ("register_fake", "Meta") for n in tensor_ops), {n: ops[n] for n in tensor_ops}
    # and importing the package loads no model code
    assert not [m for m in got["modules"] if m.startswith("dalle_fast.models")], got["modules"]


def torch_schema(qualname):
    import torch
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default._schema


def test_every_op_module_is_imported_by_the_package():
    init = open(os.path.join(PKG, "__init__.py")).read()
    for f in sorted(os.listdir(os.path.join(PKG, "ops"))):
        if f.endswith(".py") and f != "__init__.py":
            assert f"from .ops.{f[:-3]} import" in init, f"dalle_fast/__init__.py does not import ops/{f}"


def _imports(path):
    """Every module a file imports, with relative imports resolved against the package."""
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = rel[:len(rel) - node.level] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def test_ops_never_import_models_nn_or_training_code():
    ops_dir = os.path.join(PKG, "ops")
    for f in sorted(os.listdir(ops_dir)):
        if f.endswith(".py"):
            bad = [m for m in _imports(os.path.join(ops_dir, f))
                   if m.startswith(("dalle_fast.models", "dalle_fast.nn", "dalle_fast.train", "dalle_fast.generate"))]
            assert not bad, f"dalle_fast/ops/{f} imports {bad}: ops sit below models"


def test_the_import_check_sees_a_relative_import_of_models(tmp_path):
    # the check above must be able to fail: a file under ops/ with `from ..models.dalle import DALLE`
    p = os.path.join(PKG, "ops", "_probe_for_test.py")
    try:
        with open(p, "w") as f:
            f.write("def f():\n    from ..models.dalle import DALLE\n    return DALLE\n")
        assert "dalle_fast.models.dalle" in _imports(p)
    finally:
        os.remove(p)


def test_mask_kinds_are_defined_once():
    kinds = ref_sparse_attention.KINDS
    assert set(kinds) == {"full", "row", "column", "conv"}
    assert ops_sparse_attention.KINDS is kinds and nn_attention.KINDS is kinds and dalle_model.KINDS is kinds
    # no other module (package, tests, benchmarks) defines its own list of the kinds
    defined = []
    for top in ("dalle_fast", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for node in ast.parse(open(path).read(), path).body:
                        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)) and len(
                                node.value.elts) >= 3 and all(isinstance(e, ast.Constant) and e.value in kinds
                                                              for e in node.value.elts):
                            defined.append(os.path.relpath(path, ROOT))
    assert defined == [os.path.join("dalle_fast", "reference", "sparse_attention.py")], defined
    assert dalle_fast.attention_schedule(4)[-1] in kinds
