"""The CUDA sparse attention kernels run on tensor cores: their SASS, read with cuobjdump from the
built library, holds HMMA instructions (HGMMA also counts on sm_90) in the fp16 and bf16 forward
and backward kernels, and no local-memory traffic. Needs no GPU: it runs wherever the library was
built with CUDA, and skips only for a CPU-only build."""
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import dalle_fast

MMA_KERNELS = ("fwd_mma_kernel", "dq_mma_kernel", "dkdv_mma_kernel")
ELEMENT_TYPES = ("6__half", "13__nv_bfloat16")  # mangled template arguments
HEAD_DIM_TILES = (64, 128, 256)  # the kernels' compiled head-dim tiles (sparse_attention_layout.h)
# The head dims of issue 9: each runs in the smallest tile that holds it.
HEAD_DIMS = (16, 40, 48, 80, 96, 128, 160, 256)


def tile_of(D):
    return next(t for t in HEAD_DIM_TILES if D <= t)


def find_cuobjdump():
    """cuobjdump ships with triton (a torch dependency), pip's nvidia-cuda-cuobjdump, or the toolkit."""
    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@functools.lru_cache(maxsize=None)
def sass_by_function():
    """{(arch, mangled function name): [opcodes]} for the sparse attention kernels of dalle_fast._C."""
    tool = find_cuobjdump()
    assert tool, ("cuobjdump not found: it ships with triton (triton/backends/nvidia/bin), "
                  "`pip install nvidia-cuda-cuobjdump`, or the CUDA toolkit")
    text = subprocess.run([tool, "-sass", dalle_fast._C.__file__], check=True, capture_output=True,
                          text=True).stdout
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch, fn = m.group(1), None
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1) if "sparse_attention" in m.group(1) else None
            if fn:
                out[(arch, fn)] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if fn and m:
            out[(arch, fn)].append(m.group(1))
    return out


@pytest.fixture(scope="module")
def sass():
    if "cuda" not in dalle_fast.backends():
        pytest.skip("dalle_fast was built CPU-only (no nvcc at build time, or DALLE_FAST_CPU_ONLY=1): "
                    "there is no SASS to inspect")
    funcs = sass_by_function()
    assert funcs, "no sparse attention kernels found in the SASS of " + dalle_fast._C.__file__
    return funcs


def _kernels(sass, arch, kernel, etype, D):
    return [ops for (a, fn), ops in sass.items() if a == arch and f"{kernel}I{etype}Li{D}E" in fn]


def test_requested_architectures_are_built(sass):
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # setup.py's default
    want = {"sm_" + a.strip().split("+")[0].replace(".", "") for a in requested.replace(" ", ";").split(";") if a.strip()}
    archs = {a for a, _ in sass}
    assert want & {"sm_80", "sm_90"} <= archs, f"SASS for {sorted(archs)}, TORCH_CUDA_ARCH_LIST={requested!r}"


def test_head_dim_tiles_match_the_python_mirror():
    from dalle_fast.ops.sparse_attention import CUDA_HEAD_DIM_TILES
    assert CUDA_HEAD_DIM_TILES == HEAD_DIM_TILES


@pytest.mark.parametrize("kernel", MMA_KERNELS)
@pytest.mark.parametrize("etype", ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_fp16_bf16_kernels_use_tensor_cores(sass, kernel, etype, head_dim):
    D = tile_of(head_dim)  # the instantiation that runs this head dim
    for arch in sorted({a for a, _ in sass}):
        found = _kernels(sass, arch, kernel, etype, D)
        assert len(found) == 1, f"{kernel}<{etype}, {D}> not found (once) in the {arch} SASS"
        ops = found[0]
        tensor_ops = [op for op in ops if op.startswith("HMMA") or (arch == "sm_90" and op.startswith("HGMMA"))]
        assert tensor_ops, f"{kernel}<{etype}, {D}> on {arch}: no HMMA/HGMMA instruction"
        # mma.sync m16n8k16 is one HMMA.16816 per 16x8x16 product: S, dP, P V ... all go through them.
        assert any(".16816" in op for op in tensor_ops), f"{kernel}<{etype}, {D}> on {arch}: {set(tensor_ops)}"
        spills = [op for op in ops if op.startswith(("STL", "LDL"))]
        assert not spills, f"{kernel}<{etype}, {D}> on {arch} touches local memory: {set(spills)}"


def test_simt_and_decode_kernels_are_present(sass):
    for name in ("fwd_simt_kernelIf", "fwd_simt_kernelId", "dq_simt_kernelIf", "dkdv_simt_kernelIf", "decode_kernel",
                 "delta_kernel"):
        assert any(name in fn for _, fn in sass), f"{name} missing from the SASS"


def test_no_sparse_attention_kernel_touches_local_memory(sass):
    """Every tile, dtype and pass (tensor-core, SIMT, decode, delta) keeps to registers and shared
    memory: ptxas reported no spills when they were built, and the SASS shows none."""
    local = sorted({f"{arch} {fn}" for (arch, fn), ops in sass.items()
                    if any(op.startswith(("STL", "LDL")) for op in ops)})
    assert not local, local
