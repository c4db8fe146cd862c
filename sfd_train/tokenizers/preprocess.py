"""The authors' image preprocessing: RGB, ADM's centre crop, flips, pixels in [-1, 1].

ADM's ``center_crop_arr`` at side S: while the short side is at least 2S, halve the
image with BOX resampling; BICUBIC-resize so the short side is S (each side rounded with
Python's ``round``); crop the centre S x S (floor offsets). Every image is converted to
RGB first, as torchvision's ``ImageFolder`` loader does (grayscale is replicated, CMYK
converted, alpha dropped, 16-bit values clipped by Pillow's conversion).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop of an RGB image to ``size`` x ``size``; uint8 (size, size, 3)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, the way the authors' loader converts it."""
    return image if image.mode == "RGB" else image.convert("RGB")


def crop_pair(image: Image.Image, size: int) -> np.ndarray:
    """The crop and its left-right mirror: uint8 (2, size, size, 3) (mirrored after cropping)."""
    crop = center_crop(to_rgb(image), size)
    return np.stack([crop, crop[:, ::-1]])


def to_pixels(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1] (``x / 255`` then ``(x - 0.5) / 0.5``)."""
    tensor = torch.as_tensor(np.ascontiguousarray(crops) if isinstance(crops, np.ndarray) else crops)
    tensor = tensor.movedim(-1, -3).float() / 255.0
    return (tensor - 0.5) / 0.5
