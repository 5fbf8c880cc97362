"""The README's main job: `dalle-fast demo`, both halves."""
from PIL import Image

from dalle_fast.cli import main
from dalle_fast.demo import HELD_OUT, SEEN, run_text_to_image_demo


def test_text_to_image_demo_writes_a_grid_of_every_prompt(tmp_path):
    path = run_text_to_image_demo(out=str(tmp_path), num_images=2, keep=1, progress=False)
    img = Image.open(path)
    img.load()
    # one row per prompt, one kept sample per row, each tile 64 px scaled 2x plus a caption strip
    assert img.width >= 128 and img.height >= len(SEEN + HELD_OUT) * 128


def test_demo_command_skip_vae(tmp_path, capsys):
    assert main(["demo", "--skip-vae", "--no-progress", "-n", "2", "--keep", "1", "--no-families",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "text_to_image.png").is_file()
    assert "held out of training" in capsys.readouterr().out


def test_dvae_demo_trains_within_its_time_budget_and_writes_reconstructions(tmp_path):
    from dalle_fast.demo import run_dvae_demo
    s = run_dvae_demo(out=str(tmp_path), seconds=3.0, batch_size=4, progress=False)
    assert s["steps"] >= 1
    assert s["eval_psnr"] > 0  # a real number from real reconstructions
    img = Image.open(s["grid"])
    img.load()
    assert img.width > 64 and img.height > 64
