"""The inputs of single-image sampling: one source photo and two poses, each an 18-line `x y` keypoint file (in its
image's pixels, OpenPose-18 order, -1 missing) or an already rendered pose image."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from pgpis_jax import poses
from pgpis_jax.datasets import formats
from pgpis_jax.errors import UserError


def read_rgb(path: str) -> np.ndarray:
    """The image at `path` as uint8 [H, W, 3]; UserError naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read image ({error})") from None


def read_pose(path: str, image_hw: Tuple[int, int], size: int, style: str,
              stickwidth_at_512: int = 4) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """(keypoints [18, 2] in the source image's pixels or None, pose image [size, size, 3] in [-1, 1]): a keypoint
    .txt is rendered as a `style` skeleton (stick width and radius scaled from `stickwidth_at_512` at 512 px); any
    other file is read as a rendered pose image and squashed to size x size."""
    if path.endswith(".txt"):
        try:
            keypoints = formats.read_keypoint_txt(path)
        except formats.DataError as error:
            raise UserError(str(error)) from None
        resized = poses.resize_keypoints(keypoints, image_hw, (size, size))
        stick = poses.scaled_width(stickwidth_at_512, size, 512)
        rendered = poses.draw_skeleton(resized, (size, size), style, stickwidth=stick, radius=stick)
        return keypoints, rendered.astype(np.float32) / 127.5 - 1
    image = Image.fromarray(read_rgb(path)).resize((size, size), Image.BICUBIC)
    return None, np.asarray(image, np.float32) / 127.5 - 1
