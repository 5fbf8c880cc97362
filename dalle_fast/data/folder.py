"""An image-caption folder: every image file with a same-stem .txt caption beside it."""
import os

import torch

from .bad_data import BadDataCounter
from .transforms import IMAGE_EXTENSIONS, decode_caption, load_image


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Items (image (3, S, S) in [0, 1], caption str) of a folder of img.png + img.txt pairs. Images
    without a caption file (or with an empty one) are skipped when the folder is listed; an image that
    cannot be decoded is skipped when read (the next readable item is returned instead). Both are
    counted in `bad`.

    Args:
        root: the folder.
        image_size: S; images are resized and centre-cropped.
        recursive: also read subfolders.
        bad: a shared BadDataCounter (default: a new one).
    """

    def __init__(self, root, image_size=64, recursive=True, bad: BadDataCounter = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image-caption folder not found: {root}")
        self.root, self.image_size = root, image_size
        self.bad = bad if bad is not None else BadDataCounter()
        self.items = []
        walk = os.walk(root) if recursive else [(root, [], os.listdir(root))]
        for dirpath, dirnames, filenames in walk:
            dirnames.sort()
            for fn in sorted(filenames):
                stem, ext = os.path.splitext(fn)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                cap_path = os.path.join(dirpath, stem + ".txt")
                caption = ""
                if os.path.isfile(cap_path):
                    try:
                        with open(cap_path, "rb") as f:
                            caption = decode_caption(f.read())
                    except (OSError, UnicodeDecodeError) as e:
                        self.bad.add("unreadable_caption", f"{cap_path}: {e}")
                        continue
                if not caption:
                    self.bad.add("missing_caption", os.path.join(dirpath, fn))
                    continue
                self.items.append((os.path.join(dirpath, fn), caption))
        if not self.items:
            raise ValueError(f"no image with a caption found in {root} (expected image files with "
                             f"same-stem .txt captions)")
        self._broken = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        n = len(self.items)
        index = int(index) % n
        for k in range(n):
            i = (index + k) % n
            path, caption = self.items[i]
            if i in self._broken:
                continue
            try:
                return load_image(path, self.image_size), caption
            except Exception as e:  # PIL raises many types on corrupt data; a long run must go on
                self._broken.add(i)
                self.bad.add("unreadable_image", f"{path}: {e}")
        raise RuntimeError(f"no readable image left in {self.root}")
