"""Data readers: Shapes (determinism, geometry, captions, splits), an image-caption folder and
WebDataset shards made here, and bad data skipped with a warning and counted."""
import io
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from dalle_fast.data import (COLOURS, BadDataCounter, BadDataWarning, ImageCaptionFolder, Shapes,
                             WebDatasetShards, all_captions, open_dataset, resize_center_crop)
from dalle_fast.train.common import ResumableBatches


# ---- Shapes ---------------------------------------------------------------------------------------
def test_shapes_items_and_determinism():
    a, b = Shapes(20, seed=3), Shapes(20, seed=3)
    for i in range(20):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert xa.shape == (3, 64, 64) and xa.dtype == torch.float32
        assert 0 <= xa.min() and xa.max() <= 1
        assert torch.equal(xa, xb) and ca == cb
    # another seed gives other scenes
    c = Shapes(20, seed=4)
    assert any(a[i][1] != c[i][1] for i in range(20))
    # random access equals sequential access (deterministic by (seed, index) only)
    assert torch.equal(a[17][0], Shapes(20, seed=3)[17][0])


def _mask_of(img, colour):
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1) / 255
    return (img == rgb).all(0)


def test_shapes_geometry_matches_caption():
    ds = Shapes(300, seed=0)
    n_two = 0
    for i in range(len(ds)):
        scene = ds.describe(i)
        img, cap = ds[i]
        assert cap == scene["caption"] and cap == cap.lower()
        objs = scene["objects"]
        assert cap.startswith(f"a {objs[0]['size']} {objs[0]['colour']} {objs[0]['shape']}")
        # the background is black and every lit pixel has one of the objects' colours
        lit = img.sum(0) > 0
        allowed = torch.zeros_like(lit)
        for o in objs:
            allowed |= _mask_of(img, o["colour"])
        assert torch.equal(lit, allowed)
        for o in objs:
            x, y, d = o["box"]
            assert 0 <= x and 0 <= y and x + d <= 64 and y + d <= 64
        if len(objs) == 2:
            n_two += 1
            (xa, ya, da), (xb, yb, db) = objs[0]["box"], objs[1]["box"]
            rel = scene["relation"]
            assert rel in cap
            # boxes do not overlap, and the relation holds strictly with a gap
            if rel == "to the left of":
                assert xa + da + 2 <= xb
            elif rel == "to the right of":
                assert xb + db + 2 <= xa
            elif rel == "above":
                assert ya + da + 2 <= yb
            else:
                assert yb + db + 2 <= ya
    assert 100 < n_two < 200  # about half the scenes have two objects


def test_shapes_pixels_drawn_for_each_object():
    ds = Shapes(50, seed=1, p_two=0.0)
    for i in range(50):
        img, _ = ds[i]
        o = ds.describe(i)["objects"][0]
        x, y, d = o["box"]
        area = _mask_of(img, o["colour"]).sum().item()
        frac = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[o["shape"]]
        assert abs(area - frac * d * d) <= 0.25 * d * d + 2, (o, area)
        assert _mask_of(img, o["colour"])[y:y + d, x:x + d].sum().item() == area  # inside its box


def test_shapes_holdout_split():
    train = Shapes(400, seed=0, split="train")
    held = Shapes(100, seed=0, split="heldout")
    for cap in train.captions():
        assert "green triangle" not in cap
    for i in range(len(held)):
        assert held.describe(i)["objects"][0]["colour"] == "green"
        assert held.describe(i)["objects"][0]["shape"] == "triangle"
    custom = Shapes(200, split="train", holdout=["large red", ("blue", "circle")])
    for cap in custom.captions():
        assert "large red" not in cap and "blue circle" not in cap
    assert any("green triangle" in c for c in Shapes(400, split="all").captions())


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        Shapes(10, split="test")
    with pytest.raises(ValueError, match="attribute"):
        Shapes(10, holdout=["purple circle"])
    with pytest.raises(ValueError, match="length"):
        Shapes(-1)
    with pytest.raises(IndexError):
        Shapes(5)[5]


def test_all_captions():
    caps = list(all_captions())
    assert len(caps) == 36 + 36 * 4 * 36 and len(set(caps)) == len(caps)
    ds_caps = set(Shapes(200, seed=2).captions())
    assert ds_caps <= set(caps)


@given(st.integers(0, 10_000), st.sampled_from([32, 48, 64, 96]))
def test_shapes_any_seed_and_size(seed, size):
    ds = Shapes(3, seed=seed, image_size=size)
    img, cap = ds[2]
    scene = ds.describe(2)
    assert img.shape == (3, size, size) and cap == scene["caption"]
    # the picture is the caption: each object's colour, and only it, inside its box; black outside every box
    # (a swapped x/y, a wrong colour table or an object drawn off its box fails here)
    pixels = (img * 255).round().to(torch.uint8).permute(1, 2, 0)
    outside = torch.ones(size, size, dtype=torch.bool)
    for obj in scene["objects"]:
        x0, y0, d = obj["box"]
        assert 0 <= x0 and 0 <= y0 and x0 + d <= size and y0 + d <= size
        box = pixels[y0:y0 + d, x0:x0 + d].reshape(-1, 3)
        lit = box[(box != 0).any(1)]
        colour = torch.tensor(COLOURS[obj["colour"]], dtype=torch.uint8)
        assert len(lit) >= d * d // 3 and (lit == colour).all(), (obj, lit[:3])
        outside[y0:y0 + d, x0:x0 + d] = False
    assert (pixels[outside] == 0).all()


# ---- folder and shards ----------------------------------------------------------------------------
def _png_bytes(h, w, value):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_resize_center_crop():
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, 30:70] = 255  # a white centre band, 40 wide: the crop keeps it
    out = resize_center_crop(Image.fromarray(arr), 20)
    assert out.size == (20, 20)
    assert np.asarray(out)[:, 5:15].min() > 200


def test_image_caption_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png_bytes(30, 50, 100))
    (tmp_path / "a.txt").write_text("a grey box\nsecond line\n")
    (tmp_path / "sub" / "b.png").write_bytes(_png_bytes(64, 64, 200))
    (tmp_path / "sub" / "b.txt").write_text("another box")
    (tmp_path / "no_caption.png").write_bytes(_png_bytes(8, 8, 5))
    (tmp_path / "empty.png").write_bytes(_png_bytes(8, 8, 5))
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "broken.txt").write_text("broken")
    (tmp_path / "notes.md").write_text("ignored")
    bad = BadDataCounter()
    with pytest.warns(BadDataWarning):
        ds = ImageCaptionFolder(str(tmp_path), image_size=16, bad=bad)
    assert len(ds) == 3 and bad.counts["missing_caption"] == 2
    with pytest.warns(BadDataWarning, match="unreadable_image"):
        items = [ds[i] for i in range(len(ds))]
    assert bad.counts["unreadable_image"] == 1
    caps = [c for _, c in items]
    assert "a grey box" in caps and "another box" in caps
    for img, _ in items:
        assert img.shape == (3, 16, 16)
    img_a = dict((c, im) for im, c in items)["a grey box"]
    assert torch.allclose(img_a, torch.full_like(img_a, 100 / 255), atol=1 / 255)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageCaptionFolder(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no image"):
        ImageCaptionFolder(str(tmp_path))


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_shards(d):
    with tarfile.open(d / "shard-000.tar", "w") as tf:
        _add(tf, "s0.png", _png_bytes(20, 30, 10))
        _add(tf, "s0.txt", b"first")
        _add(tf, "s1.png", _png_bytes(20, 30, 20))          # no caption
        _add(tf, "s2.png", b"garbage bytes")                # undecodable
        _add(tf, "s2.txt", b"broken")
        _add(tf, "s3.jpg", _png_bytes(30, 30, 30))          # png bytes under .jpg: PIL sniffs the format
        _add(tf, "s3.txt", b"second")
    (d / "shard-001.tar").write_bytes(b"this is not a tar file" * 50)
    with tarfile.open(d / "shard-002.tar", "w") as tf:
        _add(tf, "t0.png", _png_bytes(40, 40, 40))
        _add(tf, "t0.txt", b"third")


def test_webdataset_shards_skip_and_count(tmp_path):
    _make_shards(tmp_path)
    bad = BadDataCounter()
    ds = WebDatasetShards(str(tmp_path / "shard-{000..002}.tar"), image_size=16, bad=bad)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        items = list(ds)
    assert [c for _, c in items] == ["first", "second", "third"]
    assert all(img.shape == (3, 16, 16) for img, _ in items)
    assert bad.counts == {"missing_caption": 1, "unreadable_image": 1, "corrupt_shard": 1}
    assert sum(isinstance(w.message, BadDataWarning) for w in rec) == 3
    # skip (the resume position) drops good samples only
    ds2 = WebDatasetShards(sorted(str(p) for p in tmp_path.glob("*.tar")), image_size=16)
    ds2.skip = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [c for _, c in ds2] == ["third"]


def test_open_dataset_dispatch(tmp_path):
    assert isinstance(open_dataset("shapes", length=10), Shapes)
    _make_shards(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(open_dataset(str(tmp_path)), WebDatasetShards)
        with pytest.raises(FileNotFoundError):
            open_dataset(str(tmp_path / "missing"))


def test_resumable_batches_position():
    ds = Shapes(10, seed=0)
    a = ResumableBatches(ds, 3, seed=1)
    seen = [next(a)[1] for _ in range(7)]          # crosses two epochs (3 full batches per epoch)
    b = ResumableBatches(ds, 3, seed=1)
    for _ in range(4):
        next(b)
    c = ResumableBatches(ds, 3, seed=1)
    c.load_state(b.state())
    assert [next(c)[1] for _ in range(3)] == seen[4:]
    assert seen[0] != seen[3] or seen[1] != seen[4]  # a new permutation each epoch
