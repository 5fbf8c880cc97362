import os
import sys

import torch

# `pytest benchmarks` from the repository root: the scripts import each other as benchmarks.<name>
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
