"""uint8 pixel levels -> the float32 values the batches hold, by table lookup, so that the host (NumPy) and any
device (JAX under jit) produce the same bits.

The input pipeline rounds every resized image to integer levels 0..255, so a level image carries all of an
image field's information in a quarter of the bytes; training batches travel to the devices that way and are
decoded there (pgpis_jax/input_pipeline.py). Arithmetic would not give the same bits everywhere: XLA turns a
division by a constant into a multiplication by its reciprocal, and TPUs divide approximately. A lookup in a
table made once in NumPy, with the float32 operations the batch documentation states, is exact everywhere.

| kind | value of level x (float32 arithmetic, in this order) |
|---|---|
| "signed" | x / 127.5 - 1, in [-1, 1] |
| "unit" | x / 255, in [0, 1] |
| "clip" | (x / 255 - OpenAI CLIP mean) / std, per channel |
| "imagenet" | (x / 255 - ImageNet mean) / std, per channel |
"""

from __future__ import annotations

import functools

import numpy as np

from pgpis_jax.preprocessing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

NORMALIZATIONS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)}
KINDS = ("signed", "unit", *NORMALIZATIONS)


@functools.lru_cache(maxsize=None)
def level_table(kind: str) -> np.ndarray:
    """float32 [256, 3]: the value of each level (rows) in each RGB channel (columns) for `kind`."""
    x = np.arange(256, dtype=np.float32)[:, None] * np.ones(3, np.float32)
    if kind == "signed":
        table = x / np.float32(127.5) - np.float32(1.0)
    elif kind == "unit":
        table = x / np.float32(255.0)
    elif kind in NORMALIZATIONS:
        mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[kind])
        table = (x / np.float32(255.0) - mean) / std
    else:
        raise ValueError(f"unknown level kind {kind!r}; known: {', '.join(KINDS)}")
    table.setflags(write=False)
    return table


def from_levels(levels, kind: str, xp=np):
    """uint8 levels [..., C] (C <= 3 channels, RGB order) -> float32 [..., C] values of `kind`; `xp` is numpy
    or jax.numpy (then traceable under jit)."""
    channels = levels.shape[-1]
    if channels > 3:
        raise ValueError(f"level images have at most 3 channels, got shape {levels.shape}")
    table = xp.asarray(level_table(kind)[:, :channels])
    return table[levels.astype(xp.int32), xp.arange(channels)]
