"""WebDataset tar shards (the `webdataset` package) of image + caption pairs.

A sample is the files of one key: an image (jpg/jpeg/png/webp) and a caption (txt). A corrupt or
missing shard, a sample without a caption and an undecodable image are skipped with a warning and
counted in `bad`; iteration goes on with the next sample or shard.
"""
import glob
import os

import torch

from .bad_data import BadDataCounter
from .transforms import decode_caption, load_image

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls):
    """A list of paths, a brace pattern ('data/shard-{000..009}.tar') or a glob -> list of shards."""
    if isinstance(urls, (list, tuple)):
        return [str(u) for u in urls]
    urls = str(urls)
    if os.path.isdir(urls):
        return sorted(glob.glob(os.path.join(urls, "*.tar")))
    if "{" in urls:
        import braceexpand
        return list(braceexpand.braceexpand(urls))
    found = sorted(glob.glob(urls))
    return found if found else [urls]


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Yields (image (3, S, S) in [0, 1], caption str) from the shards in order. `skip` samples
    are dropped first (the trainers' resume position); epochs repeat the shards when repeat=True.

    Args:
        urls: shard paths: a list, a glob, a brace pattern (shards/{000..009}.tar) or a folder of .tar files.
        image_size: S; images are resized and centre-cropped.
        bad: a shared BadDataCounter (default: a new one).
        repeat: start over at the end of the shards.
    """

    def __init__(self, urls, image_size=64, bad: BadDataCounter = None, repeat=False):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError(f"no WebDataset shards match {urls!r}")
        self.image_size, self.repeat = image_size, repeat
        self.bad = bad if bad is not None else BadDataCounter()
        self.skip = 0

    def _on_error(self, exn):
        self.bad.add("corrupt_shard", repr(exn))
        return True  # webdataset: True = go on with the next sample / shard

    def _raw_samples(self):
        import webdataset as wds
        for url in self.urls:
            if not os.path.exists(url) and "://" not in url:
                self.bad.add("missing_shard", url)
                continue
            pipeline = wds.WebDataset([url], handler=self._on_error, shardshuffle=False, empty_check=False)
            yield from pipeline

    def _decode(self, sample):
        key = sample.get("__key__", "?")
        img_key = next((k for k in _IMAGE_KEYS if k in sample), None)
        if img_key is None:
            self.bad.add("missing_image", f"{key} in {sample.get('__url__', '?')}")
            return None
        caption = decode_caption(sample["txt"]) if "txt" in sample else ""
        if not caption:
            self.bad.add("missing_caption", f"{key} in {sample.get('__url__', '?')}")
            return None
        try:
            return load_image(sample[img_key], self.image_size), caption
        except Exception as e:  # corrupt image bytes: PIL raises various types
            self.bad.add("unreadable_image", f"{key}: {e}")
            return None

    def __iter__(self):
        to_skip = self.skip
        while True:
            produced = 0
            for raw in self._raw_samples():
                item = self._decode(raw)
                if item is None:
                    continue
                produced += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield item
            if not self.repeat or produced == 0:
                return
