"""Per-resblock 16-bit gradient scaling (the paper's Appendix D): ResblockGradScaler and scaled branches.
See dalle_fast/amp/scaler.py for the update rule and the training-loop calls."""
from .branch import BranchHooks, ScaledBranch, scale_branches, scaled_call
from .scaler import ResblockGradScaler

__all__ = ["ResblockGradScaler", "ScaledBranch", "scale_branches", "scaled_call", "BranchHooks"]
