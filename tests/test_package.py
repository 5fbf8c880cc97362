"""Package-level behaviour: import never touches CUDA, a missing build says how to build, the build
script's spill check, the selftest and the command line."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_import_does_not_initialise_cuda():
    r = run_py("import torch, dalle_fast; print(torch.cuda.is_initialized())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_missing_build_raises_clear_error():
    # sys.modules[name] = None makes `import dalle_fast._C` fail as a missing build would
    r = run_py("import sys; sys.modules['dalle_fast._C'] = None\nimport dalle_fast")
    assert r.returncode != 0
    assert "ExtensionNotBuiltError" in r.stderr and "make build" in r.stderr


def test_backends_lists_cpu():
    import dalle_fast
    assert dalle_fast.backends()[0] == "cpu"


def test_spill_check_flags_spills_only():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from build import check_spills
    finally:
        sys.path.pop(0)
    clean = ("ptxas info    : Function properties for _Z3fooPf\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    spilled = ("ptxas info    : Function properties for _Z3barPf\n"
               "    64 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads\n")
    assert check_spills(clean) == []
    bad = check_spills(clean + spilled)
    assert len(bad) == 1 and "_Z3barPf" in bad[0]


def test_cuda_build_log_has_no_spills():
    """The CUDA kernels of this build were compiled with -Xptxas -v; the log must show no spills."""
    import dalle_fast
    log = os.path.join(ROOT, "build", "build.log")
    if "cuda" not in dalle_fast.backends():
        pytest.skip("extension built without CUDA kernels (no nvcc or DALLE_FAST_CPU_ONLY=1)")
    if not os.path.exists(log):
        pytest.skip("no build log (extension built outside scripts/build.py)")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from build import check_spills
    finally:
        sys.path.pop(0)
    with open(log) as f:
        assert check_spills(f.read()) == []


def test_cli_help_lists_commands():
    from dalle_fast.cli import build_parser
    text = build_parser().format_help()
    for cmd in ("selftest", "demo", "train-vae", "train-dalle", "train-tokenizer", "train-clip", "generate"):
        assert cmd in text
