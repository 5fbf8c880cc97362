"""Build dalle_fast: C++ CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  DALLE_FAST_CPU_ONLY=1   build the CPU kernels only
  FORCE_CUDA=1            build the CUDA kernels even if torch reports no CUDA build
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0"
  CUDA_HOME               toolkit root (bin/nvcc, include/cuda_runtime.h); found automatically otherwise
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The real toolkit root. `nvcc` on PATH may be a wrapper script, which makes torch guess wrong."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a shell wrapper: `exec /usr/local/cuda-X/bin/nvcc "$@"`
            with open(nvcc, "r", errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return os.path.realpath(c)
    return None


def nvidia_pip_includes():
    """cusparse.h & co. ship in the nvidia pip packages, not in the toolkit."""
    out = []
    try:
        import nvidia  # namespace package installed with the CUDA build of torch
        for base in nvidia.__path__:
            out += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    return out


cpu_only = os.environ.get("DALLE_FAST_CPU_ONLY", "0") == "1"
cuda_home = None if cpu_only else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# A binary wheel requires exactly the torch in pyproject.toml (the C++ ABI is per release): build it against that one.
with open(os.path.join(ROOT, "pyproject.toml")) as _f:
    _pin = re.search(r'"torch==([^"]+)"', _f.read())
if "bdist_wheel" in sys.argv and _pin and torch.__version__.split("+")[0] != _pin.group(1):
    sys.exit(f"[dalle_fast] this wheel would require torch=={_pin.group(1)} (pyproject.toml) but is being built "
             f"against torch {torch.__version__}: build it with the pinned torch")

with_cuda = (not cpu_only) and cuda_home is not None and (
    torch.version.cuda is not None or os.environ.get("FORCE_CUDA", "0") == "1")

cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []
include_dirs = [os.path.join(ROOT, "csrc", "include")]

cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DDALLE_FAST_VERSION=\"0.1.0\"", "-DDALLE_FAST_PYTHON_MODULE"]
nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-Xptxas", "-v", "--expt-relaxed-constexpr",
              "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
ext_kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=False)
def cuda_toolkit_version(home):
    """'13.0' from `nvcc --version` ('release 13.0, V13.0.88'), or 'unknown'."""
    import re
    import subprocess
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


if with_cuda:
    include_dirs += nvidia_pip_includes()
    # what `python -m dalle_fast.selftest --device cuda` reports: the toolkit and the archs built for
    cxx_flags.append(f'-DDALLE_FAST_CUDA_BUILD="{cuda_toolkit_version(cuda_home)}|'
                     f'{os.environ["TORCH_CUDA_ARCH_LIST"]}"')
    ext = CUDAExtension("dalle_fast._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                        define_macros=[("WITH_CUDA", None)],
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **ext_kwargs)
else:
    ext = CppExtension("dalle_fast._C", cpp_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

print(f"[dalle_fast] building CPU kernels: {len(cpp_sources)} files", file=sys.stderr)
if with_cuda:
    print(f"[dalle_fast] building CUDA kernels: {len(cuda_sources)} files, CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
else:
    why = ("DALLE_FAST_CPU_ONLY=1" if cpu_only else "no CUDA toolkit (nvcc) found" if not cuda_home
           else "torch has no CUDA (set FORCE_CUDA=1)")
    print(f"[dalle_fast] NOT building CUDA kernels: {why}", file=sys.stderr)

class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Keeps object files in build/temp (pip's editable builds use a fresh temp dir otherwise),
    so rebuilds are incremental."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    packages=find_packages(include=["dalle_fast", "dalle_fast.*"]),
    package_data={"dalle_fast": ["assets/*", "assets/**/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
