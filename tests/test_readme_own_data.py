"""The README's "Training on your own images and captions" commands, run exactly as written (the lines
between the own-data markers), in a fresh folder: a small image-caption folder and WebDataset shards
are written, then the tokenizer, the dVAE, the transformer and CLIP train on them, and generate
reranks with that CLIP."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- own-data:begin -->\s*```bash\n(.*?)```\s*<!-- own-data:end -->", text, re.S)
    assert block, "README has no own-data block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_block_covers_folder_and_shards():
    cmds = readme_commands()
    assert any("--data my_data" in c for c in cmds) and any("--data my_shards" in c for c in cmds)
    assert cmds[-1].startswith("dalle-fast generate")


@pytest.mark.slow
def test_readme_own_data_commands_run(tmp_path):
    bindir = os.path.dirname(sys.executable)  # the venv's dalle-fast console script
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        if argv[0] == "python":
            argv[0] = sys.executable
        if argv[0] == "dalle-fast" and not os.path.exists(os.path.join(bindir, "dalle-fast")):
            argv = [sys.executable, "-m", "dalle_fast.cli"] + argv[1:]
        argv = [os.path.join(ROOT, a) if a.startswith("scripts/") else a for a in argv]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert len(list((tmp_path / "my_data").glob("*.png"))) == 32
    assert len(list((tmp_path / "my_shards").glob("*.tar"))) == 2
    assert (tmp_path / "runs" / "dalle" / "export" / "clip").is_dir()
    assert (tmp_path / "my_grid.png").stat().st_size > 0
