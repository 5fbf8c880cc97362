"""benchmarks/report.py: the README's performance section is generated from the CSV rows, and the
committed README matches the committed rows (so no figure in it is typed by hand)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.common import DEFAULT_RESULTS, Recorder  # noqa: E402


def test_readme_section_is_generated_from_the_committed_rows():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    a, b = text.index(report.BEGIN), text.index(report.END) + len(report.END)
    want = report.section(DEFAULT_RESULTS, os.path.join(ROOT, "docs"), ROOT, draw=False)
    assert text[a:b] == want, "README's bench section is stale: run `python benchmarks/report.py`"


def test_section_from_rows(tmp_path):
    res = tmp_path / "results"
    rec = Recorder("logit_laplace")
    for prov, ms in (("eager", 20.0), ("compile", 10.0), ("dalle_fast", 2.5)):
        rec.add(op="logit_laplace_loss", provider=prov, mode="fwd+bwd", shape="(8, 3, 256, 256)", dtype="float32",
                device="cpu", median_ms=ms, ratio=20.0 / ms, gbps=20.0 if prov == "dalle_fast" else 2.0,
                extra="35% of copy ceiling 58.4 GB/s")
    rec.write(str(res / "logit_laplace.csv"))
    rec = Recorder("attention_share")
    for prov, ms, ratio in (("step_dense", 100.0, 1.0), ("step_fused", 80.0, 1.25), ("attn_dense", 40.0, 1.0),
                            ("attn_fused", 10.0, 4.0)):
        rec.add(op="attention_share", provider=prov, mode="fwd+bwd", shape="dim=64 heads=1 depth=2 N=320 B=1",
                dtype="float32", device="cpu", median_ms=ms, ratio=ratio, extra="share=0.4;saving_bound=0.3")
    rec.write(str(res / "attention_share.csv"))
    text = report.section(str(res), str(tmp_path / "figs"), str(tmp_path))
    assert text.startswith(report.BEGIN) and text.endswith(report.END)
    assert "| logit_laplace_loss | (8, 3, 256, 256) | float32 | fwd+bwd | 20 ms (1.00x) | 10 ms (2.00x) | " \
           "2.5 ms (8.00x) | 20.0 GB/s = 34% of 58.4 |" in text
    assert "| 40% | 4.00x | 1.43x | 1.67x |" in text  # share, kernels, 1/(1-0.3), 1/(1-0.4)
    assert "load average" in text and "thread(s)" in text
    assert (tmp_path / "figs" / "bench_kernels.png").stat().st_size > 0
    assert (tmp_path / "figs" / "bench_attention.png").stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nrest\n")
    assert report.main(["--results", str(res), "--readme", str(readme), "--figures", str(tmp_path / "figs")]) == 0
    assert readme.read_text().startswith("# x\n\n" + report.BEGIN) and readme.read_text().endswith("\n\nrest\n")
    with pytest.raises(ValueError, match="markers"):
        report.replace_section("no markers here", text)


def test_every_bench_script_takes_quick():
    """run_all.py --quick passes --quick to every bench_*.py; a script without the flag fails make bench-quick
    (bench_resblock_scaling.py did, found by running make bench-quick end to end)."""
    import glob
    import os
    import re
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    scripts = sorted(glob.glob(os.path.join(here, "bench_*.py")))
    assert len(scripts) >= 10
    for path in scripts:
        src = open(path).read()
        assert re.search(r"""["']--quick["']|bench_parser\(""", src), f"{os.path.basename(path)} has no --quick flag"
