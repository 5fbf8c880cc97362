"""The Shapes judge (dalle_fast.eval): right on drawn ground truth, wrong answers caught, clear errors on
bad input, and the quality report over any sampler (and the `dalle-fast eval` command)."""
import os
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_fast.data.shapes import COLOURS, SHAPES, SIZES, Shapes
from dalle_fast.eval import analyse, judge, parse_caption
from dalle_fast.eval.quality import default_prompts, evaluate, format_table, write_report


def _ground_truth(split, size, count, seed=3):
    ds = Shapes(length=count, seed=seed, image_size=size, split=split)
    return torch.stack([ds[i][0] for i in range(count)]), [ds.describe(i)["caption"] for i in range(count)]


def _accuracy(verdicts):
    out = {k: sum(float(getattr(v, k)) for v in verdicts) / len(verdicts) for k in ("colour", "shape", "size", "ok")}
    rel = [v.relation for v in verdicts if v.relation is not None]
    out["relation"] = sum(rel) / len(rel)
    return out


@pytest.mark.parametrize("split,size,count", [("all", 64, 160), ("heldout", 64, 80), ("all", 32, 80),
                                              ("all", 16, 60), ("train", 48, 60)])
def test_judge_is_right_on_drawn_ground_truth(split, size, count):
    """Seen and held-out combinations, one and two objects, several image sizes: >= 98% on every count."""
    images, captions = _ground_truth(split, size, count)
    acc = _accuracy(judge(images, captions))
    assert min(acc.values()) >= 0.98, acc


def test_every_colour_shape_and_size_at_many_positions():
    S, rng = 64, np.random.default_rng(0)
    ds = Shapes(length=1, image_size=S)
    images, captions = [], []
    for size in SIZES:
        for colour in COLOURS:
            for shape in SHAPES:
                obj = {"size": size, "colour": colour, "shape": shape}
                d = max(3, round({"small": 0.22, "large": 0.40}[size] * S))
                for _ in range(2):
                    obj["box"] = (int(rng.integers(0, S - d + 1)), int(rng.integers(0, S - d + 1)), d)
                    images.append(ds.render({"objects": [obj]}))
                    captions.append(f"a {size} {colour} {shape}")
    found = analyse(images)
    assert all(len(f) == 1 for f in found)
    for f, cap in zip(found, captions):
        assert f"a {f[0].size} {f[0].colour} {f[0].shape}" == cap
    assert all(v.ok for v in judge(images, captions, objects=found))


def test_uint8_and_float_images_agree():
    images, captions = _ground_truth("all", 64, 16)
    as_uint8 = (images * 255).round().to(torch.uint8)
    a = [[(o.colour, o.shape, o.size, o.box) for o in objs] for objs in analyse(images)]
    b = [[(o.colour, o.shape, o.size, o.box) for o in objs] for objs in analyse(as_uint8)]
    assert a == b


def test_wrong_answers_are_caught():
    ds = Shapes(length=1, seed=0, p_two=0.0)
    d = ds.describe(0)
    images = ds.render(d).unsqueeze(0)
    obj = d["objects"][0]
    other_colour = next(c for c in COLOURS if c != obj["colour"])
    other_shape = next(s for s in SHAPES if s != obj["shape"])
    other_size = next(s for s in SIZES if s != obj["size"])
    v = judge(images[:1], [f"a {obj['size']} {other_colour} {other_shape}"])[0]
    assert v.colour == 0 and v.shape == 0 and v.size == 1 and not v.ok
    v = judge(images[:1], [f"a {other_size} {obj['colour']} {obj['shape']}"])[0]
    assert v.colour == 1 and v.size == 0 and not v.ok
    blank = judge(torch.zeros(1, 3, 64, 64), ["a small red circle"])[0]
    assert not blank.count and blank.colour == 0 and not blank.ok


def test_swapped_relation_is_caught():
    ds = Shapes(length=200, seed=5, p_two=1.0)
    flip = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
    images, captions, flipped = [], [], []
    for i in range(40):
        d = ds.describe(i)
        a, b = d["objects"]
        if (a["colour"], a["shape"], a["size"]) == (b["colour"], b["shape"], b["size"]):
            continue  # identical objects: either may be the first, so a flipped caption is also true
        images.append(ds.render(d))
        captions.append(d["caption"])
        flipped.append(d["caption"].replace(f" {d['relation']} ", f" {flip[d['relation']]} "))
    assert all(v.relation for v in judge(images, captions))
    assert not any(v.relation for v in judge(images, flipped))


def test_degraded_images_blur():
    """A Gaussian blur (sigma 1 pixel) of the ground truth: the judge still reads most images right."""
    images, captions = _ground_truth("all", 64, 120)
    k = torch.exp(-torch.arange(-3, 4.0) ** 2 / 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    blurred = F.conv2d(F.conv2d(images, k, padding=(0, 3), groups=3), k.transpose(-1, -2), padding=(3, 0), groups=3)
    acc = _accuracy(judge(blurred, captions))
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.9 and acc["size"] >= 0.95, acc


@pytest.mark.parametrize("bad,err", [(torch.zeros(2, 1, 64, 64), ValueError), (torch.zeros(2, 3, 64, 32), ValueError),
                                     (torch.zeros(2, 3, 8, 8), ValueError), (torch.zeros(2, 3, 64, 64, dtype=torch.int32),
                                                                             TypeError), ("image", TypeError)])
def test_bad_images_raise(bad, err):
    with pytest.raises(err, match="images"):
        analyse(bad)


def test_bad_captions_raise():
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a purple hexagon")
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a large red circle near a small blue square")
    with pytest.raises(TypeError, match="caption"):
        parse_caption(3)
    with pytest.raises(ValueError, match="captions"):
        judge(torch.zeros(2, 3, 64, 64), ["a small red circle"])
    spec = parse_caption("A small red circle above a large blue square")
    assert spec.relation == "above" and [o.colour for o in spec.objects] == ["red", "blue"]


def test_default_prompts_cover_every_attribute_and_held_out_combinations():
    prompts = default_prompts()
    singles = {p.caption for p in prompts if p.kind == "single"}
    assert len(singles) == 36
    held = [p for p in prompts if p.group == "heldout"]
    assert {p.caption for p in held if p.kind == "single"} == {"a small green triangle", "a large green triangle"}
    assert all("green triangle" in p.caption for p in held)
    assert sum(p.kind == "pair" for p in held) >= 8 and sum(p.kind == "pair" and p.group == "seen" for p in prompts) >= 16
    rels = {parse_caption(p.caption).relation for p in prompts if p.kind == "pair"}
    assert rels == {"to the left of", "to the right of", "above", "below"}


def _oracle_sampler(wrong_every=0):
    """Draws each caption as Shapes would (a random placement), replacing every `wrong_every`-th sample
    by a blank image when wrong_every > 0."""
    ds = Shapes(length=1, image_size=64)
    rng = np.random.default_rng(0)

    def sample(captions, n):
        out = torch.zeros(len(captions), n, 3, 64, 64)
        for i, cap in enumerate(captions):
            spec = parse_caption(cap)
            for j in range(n):
                if wrong_every and j % wrong_every == 0:
                    continue
                objs = [{"size": o.size, "colour": o.colour, "shape": o.shape} for o in spec.objects]
                sides = [round({"small": 0.22, "large": 0.40}[o["size"]] * 64) for o in objs]
                if spec.relation:
                    ds._place_pair(rng, objs, sides, spec.relation)
                else:
                    objs[0]["box"] = (int(rng.integers(0, 64 - sides[0])), int(rng.integers(0, 64 - sides[0])), sides[0])
                out[i, j] = ds.render({"objects": objs})
        return out
    return sample


def test_evaluate_with_an_oracle_and_a_reranker(tmp_path):
    """Any sampler can be judged. A perfect one scores 100%; with every other sample blank, the unreranked
    figures halve and a reranker that prefers lit images restores 100%."""
    prompts = default_prompts()[::6]
    report = evaluate(_oracle_sampler(), prompts, n=4, keep=2)
    assert report.summary["unreranked"]["all"]["ok"] == 1.0
    report = evaluate(_oracle_sampler(wrong_every=2), prompts, n=4, keep=2,
                      score=lambda images, caps: images.flatten(1).mean(1))
    s = report.summary
    assert s["unreranked"]["all"]["colour"] == 0.5 and s["reranked"]["all"]["ok"] == 1.0
    assert s["reranked"]["all"]["images"] == 2 * len(prompts)
    paths = write_report(report, str(tmp_path / "out"))
    assert all(tmp_path.joinpath("out", f).is_file() for f in ("samples.csv", "summary.json", "table.md", "grid.png"))
    assert "| CLIP best 2 of 4 | heldout |" in format_table(s, 4, 2) and paths["grid"].endswith("grid.png")


def test_pooled_reports_weigh_every_run_and_keep_the_spread(tmp_path):
    """pool_reports: a perfect run and a half-wrong run pool to the mean of the two, each run's own
    summary is kept, the CSV gains a seed column and the spread lists both runs."""
    import json
    from dalle_fast.eval.quality import format_spread, pool_reports
    prompts = default_prompts()[::6]
    good = evaluate(_oracle_sampler(), prompts, n=4, keep=2)
    half = evaluate(_oracle_sampler(wrong_every=2), prompts, n=4, keep=2)
    pooled = pool_reports([good, half], [3, 4])
    assert pooled.summary["unreranked"]["all"]["colour"] == pytest.approx(0.75)
    assert pooled.summary["unreranked"]["all"]["images"] == 2 * 4 * len(prompts)
    assert [s for s, _ in pooled.per_seed] == [3, 4] and pooled.per_seed[1][1]["unreranked"]["all"]["colour"] == 0.5
    assert "per seed (3, 4): 100.0, " in format_spread(pooled) and format_spread(good) == ""
    paths = write_report(pooled, str(tmp_path / "pooled"))
    assert open(paths["csv"]).readline().startswith("seed,caption")
    assert [d["seed"] for d in json.load(open(paths["json"]))["per_seed"]] == [3, 4]
    with pytest.raises(ValueError, match="one seed per report"):
        pool_reports([good], [0, 1])


def test_evaluate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        evaluate(_oracle_sampler(), default_prompts()[:1], n=2, keep=3)
    with pytest.raises(ValueError, match="sample"):
        evaluate(lambda caps, n: torch.zeros(len(caps), 3, 64, 64), default_prompts()[:1], n=2, keep=1)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(_oracle_sampler(), [], n=2, keep=1)


def test_eval_command_on_the_bundled_model(tmp_path, capsys):
    from dalle_fast.cli import main
    out = tmp_path / "ev"
    assert main(["eval", "-n", "2", "--keep", "1", "--limit", "3", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| CLIP best 1 of 2 | seen |" in printed
    assert (out / "grid.png").is_file() and len((out / "samples.csv").read_text().splitlines()) == 1 + 3 * 2


def test_eval_command_sampling_options_and_another_vae(tmp_path, capsys):
    """--temperature / --top-k reach generate (a tiny temperature with top-k 1 makes every sample of a
    prompt the same tokens); --vae decodes with another dVAE of the same token grid; bad values name
    the argument."""
    import csv
    from dalle_fast.cli import main
    from dalle_fast.generate import bundled_model_dir
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    out = tmp_path / "greedy"
    vae_dir = os.path.join(bundled_model_dir(), "dvae")
    assert main(["eval", "-n", "3", "--keep", "1", "--limit", "2", "--top-k", "1", "--vae", vae_dir,
                 "--repeats", "2", "--out-dir", str(out)]) == 0
    assert "pooled over seeds 0..1" in capsys.readouterr().out
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3 and {r["seed"] for r in rows} == {"0", "1"}
    # greedy decoding: the three samples of each prompt are judged identically
    for cap, seed in {(r["caption"], r["seed"]) for r in rows}:
        verdicts = {tuple(v for k, v in r.items() if k not in ("sample", "rank", "reranked")) for r in rows
                    if r["caption"] == cap and r["seed"] == seed}
        assert len(verdicts) == 1, verdicts
    assert main(["eval", "-n", "2", "--keep", "1", "--limit", "1", "--temperature", "0", "--out-dir", str(tmp_path / "t0")]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err
    other = tmp_path / "tiny_vae"
    DiscreteVAE(DVAEConfig(image_size=64, group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8)
                ).save_pretrained(str(other))
    assert main(["eval", "-n", "2", "--keep", "1", "--limit", "1", "--vae", str(other), "--out-dir", str(tmp_path / "v")]) == 2
    assert "--vae" in capsys.readouterr().err


def test_clip_hard_negative_twins_differ_in_one_judged_attribute():
    """The twins train-clip --hard-negatives adds: the judge reads each twin as its own caption and finds
    the scene's caption wrong for it (shape, size or colour binding)."""
    from dalle_fast.train.clip import HardNegativeShapes
    data = HardNegativeShapes(Shapes(length=40, seed=2, split="train"))
    images, caps, twin_caps = [], [], []
    for i in range(len(data)):
        pair, (cap, twin_cap) = data[i]
        assert cap != twin_cap and pair.shape == (2, 3, 64, 64)
        images.append(pair[1])
        caps.append(cap)
        twin_caps.append(twin_cap)
    assert all(v.ok for v in judge(images, twin_caps))
    assert not any(v.ok for v in judge(images, caps))
