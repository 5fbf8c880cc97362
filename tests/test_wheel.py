"""`make wheel`'s binary wheel, installed into a new virtual environment with nothing but the wheel and
its dependencies, works there: `python -m dalle_fast.selftest` and one `dalle-fast generate` call.

It runs wherever the extension was built in this checkout (the objects of scripts/build.py in
build/temp: `make test` builds first), so making the wheel only relinks; DALLE_FAST_WHEEL=<path>
tests a given wheel instead. Otherwise it skips, saying why. The new environment gets torch (5.5 GB)
from the configured package index; on the development machine, with torch on local disk, the whole
test took the time and disk space given in the README (Install as a binary wheel).
"""
import glob
import os
import re
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import dalle_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wheel(tmp_path):
    given = os.environ.get("DALLE_FAST_WHEEL")
    if given:
        return given
    if not glob.glob(os.path.join(ROOT, "build", "temp", "**", "*.o"), recursive=True):
        pytest.skip("the extension was not built in this checkout (no objects in build/temp): run `make build` "
                    "(make test does) or set DALLE_FAST_WHEEL=<wheel>")
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build.py"), "--wheel", str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(out.stdout.strip().splitlines()[-1], f"({time.time() - t0:.0f} s)")
    (wheel,) = glob.glob(str(tmp_path / "dist" / "dalle_fast-*.whl"))
    return wheel


def _disk_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f))) / 2 ** 20


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_wheel_installs_into_a_new_venv_and_runs(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(re.match(r"dalle_fast/_C.*\.so$", n) for n in names), "the compiled extension is not in the wheel"
    assert any(n.startswith("dalle_fast/assets/") for n in names), "the bundled model is not in the wheel"
    pins = re.findall(r"^Requires-Dist: torch\s*==\s*([^\s;,]+)", meta, re.M)
    assert pins == [torch.__version__.split("+")[0]], f"torch requirement {pins}, built against {torch.__version__}"

    # nothing of the checkout may be visible: with it on PYTHONPATH (and its egg-info) pip would think
    # dalle_fast is already installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "dalle-fast")
    t0 = time.time()
    out = subprocess.run([py, "-m", "pip", "install", "-q", wheel], capture_output=True, text=True, timeout=1800,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(f"pip install of the wheel and its dependencies: {time.time() - t0:.0f} s, "
          f"{_disk_mb(venv) / 1024:.1f} GB in the new environment")
    run = lambda *cmd: subprocess.run(list(cmd), capture_output=True, text=True, cwd=tmp_path, env=env,  # noqa: E731
                                      timeout=900)
    where = run(py, "-c", "import dalle_fast, torch; print(dalle_fast.__file__, torch.__version__, "
                          "','.join(dalle_fast.backends()))")
    assert where.returncode == 0, where.stderr
    path, torch_version, backends = where.stdout.split()
    assert path.startswith(str(venv)), f"imported {path}, not the installed wheel"
    assert torch_version == torch.__version__ and "cpu" in backends.split(","), where.stdout
    # a checkout built with nvcc makes a wheel that carries the CUDA kernels too (make wheel relinks them)
    built_here = [] if os.environ.get("DALLE_FAST_WHEEL") else dalle_fast.backends()
    assert not built_here or sorted(backends.split(",")) == sorted(built_here), \
        f"the wheel's compiled backends {backends} differ from this checkout's build {built_here}"
    print(f"the new environment imports {path} (torch {torch_version}, compiled backends {backends})")

    selftest = run(py, "-m", "dalle_fast.selftest")
    assert selftest.returncode == 0, selftest.stdout[-4000:] + selftest.stderr[-4000:]
    assert "cpu" in selftest.stdout
    if "cuda" in built_here:  # the selftest reports the wheel's CUDA build (toolkit and archs)
        assert re.search(r"CUDA kernels: built with toolkit [0-9.]+ for archs", selftest.stdout), selftest.stdout[:2000]

    t0 = time.time()
    gen = run(cli, "generate", "a large red circle", "-n", "2", "--keep", "1", "--threads", "1",
              "--out", str(tmp_path / "grid.png"))
    assert gen.returncode == 0, gen.stdout[-4000:] + gen.stderr[-4000:]
    assert (tmp_path / "grid.png").stat().st_size > 0
    print(f"selftest and generate in the new environment: ok ({time.time() - t0:.0f} s for generate)")
