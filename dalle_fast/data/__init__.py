"""Data: the synthetic Shapes set, image-caption folders, WebDataset shards, and their transforms.
Every reader yields (image float tensor (3, S, S) in [0, 1], caption str); bad items are skipped,
warned about and counted in a BadDataCounter."""
from .bad_data import BadDataCounter, BadDataWarning
from .folder import ImageCaptionFolder
from .shapes import COLOURS, RELATIONS, SHAPES, SIZES, Shapes, all_captions
from .shards import WebDatasetShards
from .transforms import load_image, resize_center_crop, to_tensor


def open_dataset(spec, image_size=64, bad=None, seed=0, length=100_000, split="train"):
    """The reader for a data spec.

    Args:
        spec: 'shapes' -> Shapes; a directory of .tar files, a .tar path, a glob or a brace pattern ->
          WebDatasetShards (repeating); any other directory -> ImageCaptionFolder.
        image_size: pixels per side of the items.
        bad: a shared BadDataCounter for the folder and shard readers.
        seed, length, split: of Shapes.
    Returns:
        A torch Dataset or IterableDataset of (image, caption); FileNotFoundError for anything else.
    """
    import glob
    import os
    if spec == "shapes":
        return Shapes(length, seed=seed, image_size=image_size, split=split)
    spec = str(spec)
    is_dir = os.path.isdir(spec)
    if (is_dir and glob.glob(os.path.join(spec, "*.tar"))) or spec.endswith(".tar") or "{" in spec:
        return WebDatasetShards(spec, image_size=image_size, bad=bad, repeat=True)
    if is_dir:
        return ImageCaptionFolder(spec, image_size=image_size, bad=bad)
    raise FileNotFoundError(f"data {spec!r}: expected 'shapes', an image-caption folder or WebDataset shards")


__all__ = ["Shapes", "all_captions", "SHAPES", "COLOURS", "SIZES", "RELATIONS", "ImageCaptionFolder",
           "WebDatasetShards", "BadDataCounter", "BadDataWarning", "load_image", "resize_center_crop",
           "to_tensor", "open_dataset"]
