"""The inputs of single-image sampling: one source photo and two poses, each an 18-line `x y` keypoint file (in its
image's pixels, OpenPose-18 order, -1 missing) or an already rendered pose image.

`read_inputs` reads and checks all three files (they exist and decode, keypoints are finite and inside the photo
or handled by the joints-outside policy) before a sampler loads any checkpoint; `render_pose` then draws a pose
at the size a stage needs."""

from __future__ import annotations

import dataclasses
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
    except (OSError, SyntaxError, ValueError) as error:   # PIL's errors for broken or truncated files
        raise UserError(f"{path}: cannot read image ({error})") from None


@dataclasses.dataclass
class Pose:
    """One pose input: keypoints [18, 2] in the source photo's pixels (a .txt file) or a rendered pose image
    (uint8 [H, W, 3], any other file)."""

    path: str
    keypoints: Optional[np.ndarray] = None
    image: Optional[np.ndarray] = None


@dataclasses.dataclass
class Inputs:
    """The checked inputs: the photo (uint8 [H, W, 3]), the two poses, and what the joints-outside policy changed."""

    image: np.ndarray
    source: Pose
    target: Pose
    outside: formats.OutsideJoints


def read_pose(path: str, image_hw: Tuple[int, int], outside: formats.OutsideJoints) -> Pose:
    """A keypoint .txt (checked against the photo's size `image_hw` with the `outside` policy) or a pose image."""
    if not path.endswith(".txt"):
        return Pose(path, image=read_rgb(path))
    keypoints, lines = formats.read_keypoint_txt(path, with_lines=True)
    return Pose(path, keypoints=outside.apply(keypoints, image_hw, path, lines))


def read_inputs(source_image: str, source_pose: str, target_pose: str, joints_outside: str = "error") -> Inputs:
    """Reads and checks the photo and both poses; UserError naming the file (and line) for the first problem.
    joints_outside: "error", "clip" or "drop" (formats.OutsideJoints); what it changed is printed."""
    outside = formats.OutsideJoints(joints_outside)
    image = read_rgb(source_image)
    hw = image.shape[:2]
    inputs = Inputs(image, read_pose(source_pose, hw, outside), read_pose(target_pose, hw, outside), outside)
    if outside.joints:
        print(outside.summary(f"--source_pose / --target_pose ({hw[0]} x {hw[1]} photo)"), flush=True)
    return inputs


def render_pose(pose: Pose, image_hw: Tuple[int, int], size: int, style: str,
                stickwidth_at_512: int = 4) -> np.ndarray:
    """The pose as a [size, size, 3] image in [-1, 1]: keypoints drawn as a `style` skeleton (stick width and radius
    scaled from `stickwidth_at_512` at 512 px), a pose image squashed to size x size."""
    if pose.keypoints is None:
        image = Image.fromarray(pose.image).resize((size, size), Image.BICUBIC)
        return np.asarray(image, np.float32) / 127.5 - 1
    resized = poses.resize_keypoints(pose.keypoints, image_hw, (size, size))
    stick = poses.scaled_width(stickwidth_at_512, size, 512)
    rendered = poses.draw_skeleton(resized, (size, size), style, stickwidth=stick, radius=stick)
    return rendered.astype(np.float32) / 127.5 - 1
