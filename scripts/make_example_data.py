#!/usr/bin/env python
"""Writes a small image-caption folder (img_0000.png + img_0000.txt, ...) drawn from the Shapes set,
and optionally the same items as WebDataset shards (shard-000.tar, ...: key.png + key.txt), to try
the training commands of the README on data laid out as your own would be.

    python scripts/make_example_data.py my_data --count 64 --shards my_shards --per-shard 32
"""
import argparse
import io
import os
import tarfile

from PIL import Image


def write_folder(out, count, image_size=64, seed=0):
    """count PNG + TXT pairs of the Shapes training split in `out`; returns the list of keys."""
    from dalle_fast.data import Shapes
    os.makedirs(out, exist_ok=True)
    data = Shapes(count, seed=seed, image_size=image_size, split="train")
    keys = []
    for i in range(count):
        image, caption = data[i]
        key = f"img_{i:04d}"
        array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(os.path.join(out, key + ".png"))
        with open(os.path.join(out, key + ".txt"), "w") as f:
            f.write(caption + "\n")
        keys.append(key)
    return keys


def write_shards(folder, keys, out, per_shard):
    """The folder's pairs as WebDataset tar shards of per_shard samples; returns the shard paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for s in range(0, len(keys), per_shard):
        path = os.path.join(out, f"shard-{s // per_shard:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for key in keys[s:s + per_shard]:
                for ext in (".png", ".txt"):
                    with open(os.path.join(folder, key + ext), "rb") as f:
                        data = f.read()
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the image-caption folder to write")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shards", default=None, help="also write WebDataset shards into this folder")
    p.add_argument("--per-shard", type=int, default=32)
    a = p.parse_args(argv)
    keys = write_folder(a.out, a.count, a.image_size)
    print(f"wrote {len(keys)} image-caption pairs in {a.out}")
    if a.shards:
        paths = write_shards(a.out, keys, a.shards, a.per_shard)
        print(f"wrote {len(paths)} shards in {a.shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
