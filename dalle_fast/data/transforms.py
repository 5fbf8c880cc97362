"""Image loading and the resize + center-crop every reader applies."""
import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scales the shorter side to `size` (bicubic, antialiased) and crops the centre square.

    Args:
        img: a PIL image.
        size: side of the result.
    Returns:
        A size x size PIL image.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1].

    Args:
        img: a PIL RGB image.
    Returns:
        float tensor (3, H, W).
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def load_image(source, size: int) -> torch.Tensor:
    """Reads, converts to RGB, resizes and centre-crops an image. Raises on unreadable data.

    Args:
        source: a path or the file's bytes.
        size: side of the result.
    Returns:
        (3, size, size) float tensor in [0, 1].
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        img.load()  # force decoding here so truncated files fail inside the caller's try
        return to_tensor(resize_center_crop(img, size))


def decode_caption(raw) -> str:
    """Caption bytes/str -> the first non-empty line, stripped; '' when there is none."""
    text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""
