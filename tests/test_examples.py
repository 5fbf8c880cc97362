"""The scripts of examples/ run on tiny sizes and report their speedup (they assert their own
correctness checks: kind='full' reproduces causal attention, the fused ops match the eager code).
They run in this process (their main(argv)), as `python examples/<script> <args>` would."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "sparse_attention_transformer.py": ["--dim", "64", "--depth", "2", "--text-len", "8", "--image-size", "8",
                                        "--steps", "1", "--threads", "1"],
    "fused_dvae_losses.py": ["--image-size", "16", "--codes", "64", "--batch", "2", "--steps", "1", "--threads", "1"],
}


def test_every_example_is_tested():
    assert sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs_and_prints_its_speedup(script, capsys):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "examples", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        speedup = module.main(TINY[script])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "max |difference|" in out
    assert speedup > 0 and f"speedup {speedup:.2f}x" in out, out
