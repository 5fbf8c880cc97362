"""The README's main job: `dalle-fast demo`, both halves."""
import math

import torch
from PIL import Image

from dalle_fast.cli import main
from dalle_fast.demo import HELD_OUT, SEEN, run_text_to_image_demo
from dalle_fast.models.dvae import DiscreteVAE


def _demo_eval_images(s):
    """The fixed eval batch run_dvae_demo's training evaluates on (its data, seed and eval_images=16)."""
    from dalle_fast.data import open_dataset
    from dalle_fast.train.vae import _eval_batch
    size = s["model_config"]["image_size"]
    return _eval_batch(open_dataset("shapes", image_size=size, length=20_000), 16, 0, size)[0]


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
    assert s["steps"] >= 1 and s["finished"]
    # the reported PSNR is that of the saved model's reconstructions of the demo's eval images, recomputed
    # here from the definition (10 log10(1 / MSE)): a wrong model, batch or formula in the report fails
    images = _demo_eval_images(s)
    model = DiscreteVAE.from_pretrained(s["model_dir"])
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    mse = ((recon.double() - images.double()) ** 2).mean().item()
    assert math.isclose(s["eval_psnr"], 10 * math.log10(1 / mse), rel_tol=1e-5), (s["eval_psnr"], mse)
    img = Image.open(s["grid"])
    img.load()
    assert img.width > 64 and img.height > 64
