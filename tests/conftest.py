import os

import torch
from hypothesis import HealthCheck, settings

# CI and developer machines have 2 cores shared with the build; keep timings out of property tests.
settings.register_profile("dalle_fast", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 30)),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dalle_fast")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--fake-cuda", action="store_true", default=False,
                     help="run only the CUDA tests, on FakeTensorMode 'cuda' tensors (tests/fake_cuda.py)")
    parser.addoption("--fake-cuda-every-case", action="store_true", default=False,
                     help="with --fake-cuda: every parametrised case, not one per test function and dtype")


def pytest_configure(config):
    if config.getoption("--fake-cuda"):
        import fake_cuda
        fake_cuda.install()
        config.pluginmanager.register(fake_cuda, "fake_cuda")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fake-cuda"):
        import fake_cuda
        fake_cuda.select(config, items, config.getoption("--fake-cuda-every-case"))
