"""Loads the compiled op library. Never touches CUDA."""
import importlib

BUILD_HELP = (
    "dalle_fast's compiled extension (dalle_fast._C) is not built or failed to load.\n"
    "Build it from the source tree with:\n"
    "    make build            # venv + deps + compile (CUDA kernels too when nvcc is found)\n"
    "or, in an environment that already has torch==2.14.1:\n"
    "    pip install --no-build-isolation -e .\n"
    "Set DALLE_FAST_CPU_ONLY=1 to skip the CUDA kernels.")


class ExtensionNotBuiltError(ImportError):
    pass


def load():
    try:
        import torch  # noqa: F401  (the library links against libtorch)
        return importlib.import_module("dalle_fast._C")
    except ImportError as e:
        raise ExtensionNotBuiltError(f"{BUILD_HELP}\n(original error: {e})") from e


def backends():
    """Backends compiled into the library.

    Returns:
        ['cpu'] or ['cpu', 'cuda'].
    """
    import torch
    return str(torch.ops.dalle_fast._build_info()).split(",")
