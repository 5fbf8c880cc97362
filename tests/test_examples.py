"""The scripts of examples/ run on tiny sizes and report their speedup (they assert their own
correctness checks: kind='full' reproduces causal attention, the fused ops match the eager code)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "sparse_attention_transformer.py": ["--dim", "64", "--depth", "2", "--text-len", "8", "--image-size", "8",
                                        "--steps", "1", "--threads", "1"],
    "fused_dvae_losses.py": ["--image-size", "16", "--codes", "64", "--batch", "2", "--steps", "1", "--threads", "1"],
}


def test_every_example_is_tested():
    assert sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs_and_prints_its_speedup(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *TINY[script]], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "max |difference|" in out.stdout
    speedup = [line for line in out.stdout.splitlines() if "speedup" in line]
    assert speedup and float(speedup[-1].rsplit("speedup ", 1)[1].rstrip("x")) > 0, out.stdout
