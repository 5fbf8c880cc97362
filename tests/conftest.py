import os

import torch
from hypothesis import HealthCheck, settings

# CI and developer machines have 2 cores shared with the build; keep timings out of property tests.
settings.register_profile("dalle_fast", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 30)),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dalle_fast")
torch.set_num_threads(min(2, os.cpu_count() or 1))
