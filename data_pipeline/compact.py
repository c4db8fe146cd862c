"""Compact REPA features (``dino_storage: int8``): int8 values with a per-channel and a per-token scale.

A feature map ``x`` (D x H x W, tokens ``t = h * W + w``) is stored as int8 values ``q`` (D x H x W)
and one float32 vector ``scale`` of D + H*W entries: a scale ``c`` per channel, then a scale ``s``
per token. The stored features are ``q * c[:, None] * s[None, :]`` (float32, multiplied in that
order), about half the bytes of float16. The loader decodes them in its workers into float16 (a
rounding 20 times finer than the int8 one), so the trainer's process converts them exactly as it
converts float16 features.

Why both scales (measured in ``benchmarks/compact_features.py``, see docs/data.md): a scale per
token alone is set by the token's largest channel, so a few outlier channels -- which DINOv2
features have -- leave the ordinary channels only a few levels; a scale per channel alone is set
by the channel's largest token, so one high-norm token does the same to every other token. Here
the channel scale is taken on the tokens normalised to unit length, ``c = max_t |x[:, t]| /
||x[:, t]||``, so that high-norm tokens do not set it; the token scale then spreads each token of
``x / c`` over the full int8 range: ``s = max_d |x[d, t] / c[d]| / 127``.

Quantising runs on the CPU in numpy, one sample at a time (so the work stays in cache), and gives
the same bytes on every run: elementwise float32 arithmetic and exact maxima; the token norms only
choose the channel scales and are stored in no form.
"""

from __future__ import annotations

import numpy as np
import torch

LEVELS = 127
"""Largest stored magnitude; -128 is never written, so the range is symmetric."""
VALUE_DTYPE = np.dtype("|i1")
SCALE_DTYPE = np.dtype("<f4")


def scale_length(shape: tuple[int, ...]) -> int:
    """Entries of the scale vector of a (D, H, W) feature map: D + H * W."""
    d, h, w = shape
    return d + h * w


def quantize(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (B, D, H, W), any float dtype -> ``(values int8 (B, D, H, W), scales float32 (B, D + H*W))``.

    A channel or a token that is all zeros gets a zero scale and zero values. A NaN or inf in a
    sample makes its scales NaN, so readers and ``sfd-data inspect`` report the sample.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().float().numpy()
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"features must be (B, D, H, W), got shape {list(x.shape)}")
    b, d, h, w = x.shape
    n = h * w
    values = np.empty((b, d, n), dtype=VALUE_DTYPE)
    scales = np.empty((b, d + n), dtype=SCALE_DTYPE)
    work = np.empty((d, n), dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for i in range(b):
            t = x[i].reshape(d, n)
            norm = np.sqrt(np.einsum("dt,dt->t", t, t))
            norm[norm == 0] = 1
            np.abs(t, out=work)
            work /= norm
            channel = work.max(axis=1)
            np.divide(t, np.where(channel == 0, 1, channel)[:, None], out=work)
            token = np.abs(work).max(axis=0) / np.float32(LEVELS)
            work /= np.where(token == 0, 1, token)
            np.rint(work, out=work)
            np.clip(work, -LEVELS, LEVELS, out=work)
            np.nan_to_num(work, copy=False, nan=0.0)
            values[i] = work
            scales[i, :d] = channel
            scales[i, d:] = token
    return values.reshape(b, d, h, w), scales


def dequantize(values: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stored int8 values (B, D, H, W) and scales (B, D + H*W) -> float32 features (B, D, H, W).

    Exactly what the loader returns: ``float16(float32(q) * c * s)`` (rounded to float32 after each
    product, then to float16), as float32.
    """
    q = torch.as_tensor(np.ascontiguousarray(values))
    s = torch.as_tensor(np.ascontiguousarray(scales)).float()
    b, d, h, w = q.shape
    if s.shape != (b, d + h * w):
        raise ValueError(f"scales of shape {list(s.shape)} do not fit values of shape {list(q.shape)}")
    out = q.float().view(b, d, h * w) * s[:, :d, None]
    return (out * s[:, None, d:]).half().float().view(b, d, h, w)


def dequantize_into(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """One sample, in place: int8 ``values`` (D, T) and float32 ``scales`` (D + T,) into float16 ``out``
    (D, T), through the float32 ``scratch`` (D, T); the same arithmetic as :func:`dequantize`."""
    d = values.shape[0]
    torch.mul(values, scales[:d].view(d, 1), out=scratch)
    scratch.mul_(scales[d:].view(1, -1))
    out.copy_(scratch)
