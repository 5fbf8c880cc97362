"""`python -m dalle_fast.selftest`: the machine report (GPU, driver, toolkit, archs), a clean "no CUDA
device" where there is none, and the advice printed on a failing row."""
import io
import types

import torch

from dalle_fast import selftest
from dalle_fast.cli import main as cli_main


def _report(devices):
    out = io.StringIO()
    rc = selftest.run(devices, out=out)
    return rc, out.getvalue()


def test_cuda_on_a_machine_without_one_says_so_cleanly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, text = _report(["cuda"])
    assert rc == 2
    assert "no CUDA device" in text and "nothing tested" in text
    assert "Traceback" not in text and "max err" not in text  # no table: nothing was run


def test_cli_selftest_device_cuda_exits_2_without_a_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["selftest", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def _fake_gpu(monkeypatch, major, minor, archs="8.0;9.0"):
    monkeypatch.setattr(selftest, "cuda_build", lambda: ("13.0", archs))
    monkeypatch.setattr(selftest, "driver_version", lambda: "580.65.06")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    props = types.SimpleNamespace(name="NVIDIA H200", major=major, minor=minor, total_memory=141 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


def test_cuda_report_names_gpu_driver_toolkit_and_archs(monkeypatch):
    _fake_gpu(monkeypatch, 9, 0)
    out = io.StringIO()
    assert selftest.describe_cuda(out) is True
    text = out.getvalue()
    for want in ("NVIDIA H200", "sm_90", "141.0 GiB", "driver: 580.65.06", "toolkit 13.0", "archs 8.0;9.0",
                 f"CUDA runtime {torch.version.cuda}"):
        assert want in text, (want, text)
    assert "WARNING" not in text
    # a GPU the build has no code for is named, with the rebuild that fixes it
    _fake_gpu(monkeypatch, 10, 0)
    out = io.StringIO()
    selftest.describe_cuda(out)
    assert 'WARNING' in out.getvalue() and 'TORCH_CUDA_ARCH_LIST="10.0"' in out.getvalue()


def test_arch_coverage():
    assert selftest._arch_covered((9, 0), "8.0;9.0")
    assert selftest._arch_covered((8, 6), "8.0;9.0")      # sm_80 SASS runs on sm_86
    assert not selftest._arch_covered((10, 0), "8.0;9.0")
    assert selftest._arch_covered((10, 0), "8.0;9.0+PTX")  # the PTX is JIT-compiled
    assert not selftest._arch_covered((7, 5), "8.0;9.0+PTX")


def test_a_failing_row_says_what_to_do(monkeypatch):
    monkeypatch.setattr(selftest, "checks", lambda: [
        ("sparse_attention", lambda device: [("sparse_attention", "row T=5", torch.float16, 1.0, 1e-3)]),
        ("decode", lambda device: [("transformer_decode_step", "x", torch.float32, 0.0, 1e-6)])])
    rc, text = _report(["cpu"])
    assert rc == 1 and "1 FAILED" in text and "FAIL" in text
    assert "file an issue" in text and "DALLE_FAST_ATTENTION_BACKEND=flex" in text
    # a crashing check is a failure too, and the others still run
    monkeypatch.setattr(selftest, "checks", lambda: [
        ("boom", lambda device: 1 / 0), ("decode", lambda device: [("d", "x", torch.float32, 0.0, 1e-6)])])
    rc, text = _report(["cpu"])
    assert rc == 1 and "ZeroDivisionError" in text and "DALLE_FAST_ATTENTION_BACKEND=flex" in text
    assert text.count(" ok") == 1


def test_passing_rows_give_no_advice(monkeypatch):
    monkeypatch.setattr(selftest, "checks", lambda: [
        ("decode", lambda device: [("transformer_decode_step", "x", torch.float32, 0.0, 1e-6)])])
    rc, text = _report(["cpu"])
    assert rc == 0 and "all passed" in text and "DALLE_FAST_ATTENTION_BACKEND" not in text
