"""The benchmarks as pytest-benchmark tests, on CI-sized inputs:

    pytest benchmarks --benchmark-only                          # time every case
    pytest benchmarks --benchmark-only --benchmark-autosave     # save the run under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare      # compare with the last saved run
    pytest benchmarks --benchmark-only --benchmark-histogram    # SVG histograms per group

Each case is the very callable that the script of the same name times (its `case(provider, mode)`),
so the set-up is written once. `pytest tests` (and plain `pytest`: testpaths = tests) never collects
this folder. Cases whose peer (dalle-pytorch) is not installed skip with the reason.
"""
import importlib

import pytest
import torch

SCRIPTS = ["bench_gumbel_softmax", "bench_logit_laplace", "bench_sparse_attention", "bench_dalle_train",
           "bench_dvae_train", "bench_generate", "bench_peer_train", "bench_attention_share"]
PARAMS = [pytest.param(name, provider, mode, id=f"{name[6:]}-{provider.replace(' ', '_')}-{mode}")
          for name in SCRIPTS for provider, mode in importlib.import_module(f"benchmarks.{name}").CASES]


@pytest.mark.parametrize("script,provider,mode", PARAMS)
def test_benchmark(benchmark, script, provider, mode):
    torch.manual_seed(0)
    try:
        fn = importlib.import_module(f"benchmarks.{script}").case(provider, mode, quick=True)
    except ModuleNotFoundError as e:
        pytest.skip(f"peer not installed: {e}")
    benchmark.group = f"{script[6:]} {mode}"
    benchmark.extra_info.update(provider=provider, torch=torch.__version__, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
