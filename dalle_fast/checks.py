"""Checks of tensor values that neither synchronise the host with a GPU nor break a torch.compile graph.

Shapes and dtypes are checked in Python as usual; a check that must read values (token ids in range,
finite logits) goes through check_values: in eager mode on the CPU it reads the value and raises a
ValueError (reading a CPU tensor costs no sync); on a GPU and under torch.compile it enqueues
torch._assert_async, which fails on the device instead of stopping the host or splitting the graph.
"""
import torch


def check_values(ok, message, detail=None):
    """Raises ValueError(message) unless the bool tensor `ok` is true. detail: a callable returning more
    text (", got ..."), called only on failure in eager mode, where it may read tensors."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message + (detail() if detail is not None else ""))
    else:
        torch._assert_async(ok, message)


def check_ids(ids, high, what):
    """Integer ids in [0, high): ValueError naming `what` and the range found (see check_values)."""
    if ids.numel() == 0:
        return
    check_values(((ids >= 0) & (ids < high)).all(), f"{what} must be in [0, {high})",
                 lambda: f", got [{int(ids.min())}, {int(ids.max())}]")
