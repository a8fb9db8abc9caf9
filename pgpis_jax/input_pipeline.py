"""tf.data input pipeline: TFDS pair records -> host-local batches of NumPy arrays in one of the registered
batch layouts (a config chooses it with `config.data.layout`; a method names the layouts it reads).

    pipeline = InputPipeline("deepfashion/256x176", split="train", batch_size=64, layout="cfld", seed=42)
    batch = next(pipeline)                 # dict of NumPy arrays, leading dimension batch_size // process_count
    state = pipeline.get_state()           # small JSON-able dict: save it with the checkpoint
    pipeline = InputPipeline(..., state=state)    # continues with exactly the batches an uninterrupted run sees

What it does, per host (`process_index` / `process_count` default to `jax.process_index()` /
`jax.process_count()`):
- **Training** (`train=True`): epochs forever, one global stream whatever the number of hosts. Epoch e reads the
  whole split with the file order shuffled and a shuffle buffer, both seeded from (seed, e) only, takes
  `steps_per_epoch * batch_size` records and cuts them into global batches; host i keeps rows
  [i*B/n, (i+1)*B/n) of every global batch, dropping the other hosts' records *before* decoding them. So the
  global batches (and their `example_id`s and augmentations) are the same for 1 process or 64, and a run resumes
  on a slice of another size with the same data. The position is (epoch, step) of the global stream; resuming
  rebuilds epoch e and skips step * batch_size encoded records (no decoding), so a resumed run yields exactly
  the batches of an uninterrupted one. Every host reads (not decodes) all records.
- **Evaluation** (`train=False`): the split's N records are cut into `process_count` contiguous slices (process i
  reads records [i*N//n, (i+1)*N//n)), disjoint and covering the split; one pass in record order, no
  augmentation; the last partial batch is padded with zeros and every host yields the same number of batches
  (`mask` marks real examples); `example_id` is the record's index in the split.
- Per record, in parallel (`num_parallel_calls`, deterministic order): JPEG/PNG decode, resize (bicubic with
  antialiasing, rounded to uint8 levels as PIL's output is), pose rendering (`pgpis_jax.poses`, on the host
  through `tf.numpy_function`), the layout's augmentation with stateless random numbers seeded by
  (epoch seed, position in the epoch); then batching and `prefetch`.
- **Encoded batches.** tf.data produces the compact form of each batch: image fields as uint8 levels (every
  resized image is rounded to levels anyway; the layout's `levels` names each field's kind of
  `pgpis_jax.levels`), and pose maps as their parts: CFLD's `<role>_pose_skeleton` (uint8 [P, P, 3]),
  `<role>_pose_rows` and `<role>_pose_columns` (the Gaussian factors, float32 [P, 18]); PIDM's
  `<role>_pose_skeleton` (uint8 [S, S, 3]) and `<role>_pose_limb_rows` (int16 [17, S, 2], `poses.pidm_pose_parts`).
  `decode_batch` turns them into the batches tabled below, with NumPy or JAX, bit for bit the same. By default
  `next()` decodes on the host; with `encoded=True` (training) it returns the compact form, a quarter of the
  bytes or less, and `device_decode` is the JAX function the trainer runs inside the jitted step.

Keypoints are (x, y) pixels (see `pgpis_jax.poses`), -1 = missing. Images (decoded) are NHWC float32.

## Batches (the one place they are documented)

Every batch also has `mask`: bool [B], False for evaluation padding, and `example_id`: int32 [B], the
example's position in this epoch's global stream (evaluation: its record index; distinct within a global batch;
methods derive per-example noise from it, so a step's randomness depends neither on micro-batching nor on the
number of hosts). With `include_names` (default: evaluation
only) it has `source_name` and `target_name` (bytes [B]). S, C, P are the `image_size`, `condition_size`,
`pose_size` options; sizes are (height, width); "CLIP-norm" = (x/255 - OpenAI CLIP mean) / std, "ImageNet-norm"
likewise with ImageNet statistics; [-1, 1] = x/127.5 - 1; [0, 1] = x/255.

| layout | key | shape | values |
|---|---|---|---|
| `pairs` (generic, demo) | `source_image`, `target_image` | [B, H, W, 3] | [-1, 1], H x W = `image_size` (default: stored size) |
| | `source_pose`, `target_pose` | [B, H, W, 3] | [0, 1], skeleton of `pose_style` ("pcdms"; widths scaled from 4 px at 512) |
| | `source_keypoints`, `target_keypoints` | [B, 18, 2] | (x, y) pixels of H x W, -1 missing |
| `pcdm_prior` | `source_clip`, `target_clip` | [B, 224, 224, 3] | CLIP-norm (image squashed to 224x224) |
| | `source_pose_coords`, `target_pose_coords` | [B, 36] | `poses.normalize_keypoints`: x/W, y/H in [0, 1], -1 missing |
| `pcdm_inpaint` | `image` | [B, S, 2S, 3] | [-1, 1], [source \\| target], each squashed to S x S (S = 512) |
| | `pose` | [B, S, 2S, 3] | [-1, 1], [source \\| target] "pcdms" skeletons (stick width and radius 4 at S = 512) |
| | `source_dino` | [B, 224, 224, 3] | CLIP-norm source (PCDMs feeds DINOv2 CLIP-processed input) |
| | `target_clip` | [B, 224, 224, 3] | CLIP-norm target (its CLIP embedding is the training-time global token) |
| `pcdm_refine` | `target_image` | [B, S, S, 3] | [-1, 1] |
| | `coarse_image` | [B, S, S, 3] | [-1, 1], the stage-2 result `<coarse_dir>/<source stem>_to_<target stem>.png` |
| | `source_dino` | [B, 224, 224, 3] | CLIP-norm source |
| `cfld` | `source_image`, `target_image` | [B, S, S, 3] | [-1, 1], squashed (S = 512) |
| | `condition_image` | [B, C, C, 3] | [-1, 1], source at C = 256, flipped left-right with p = `flip_prob` (0.5) in training |
| | `source_pose`, `target_pose` | [B, P, P, 21] | [0, 1], `poses.cfld_pose_map` at P = 256 |
| | `reference_image` | [B, H, W, 3] | [-1, 1], the stored target (option `reference`: the ground truth CFLD scores against) |
| `fpdm` | `target_image` | [B, 512, 352, 3] | [-1, 1] |
| | `target_pose` | [B, 512, 352, 3] | [0, 1], "pidm" skeleton drawn on 550 x 375 (`pose_canvas`), resized |
| | `source_dino` | [B, 512, 512, 3] | ImageNet-norm source (training: from 256 x 256 with p = 0.5) |
| | `source_clip`, `target_pose_clip` | [B, 224, 224, 3] | CLIP-norm source and target pose image |
| `fpdm_fusion` | `source_clip`, `target_clip` | [B, 224, 224, 3] | CLIP-norm, short side to 224, centre 224 x 224 |
| | `target_pose_clip` | [B, 224, 224, 3] | CLIP-norm "pidm" skeleton drawn on 1101 x 750 (`pose_canvas`), squashed |
| `reposedm` | `source_image`, `target_image` | [B, S, S, 3] | [-1, 1] (S = 256) |
| | `source_pose`, `target_pose` | [B, S, S, 20] | [0, 1], `poses.pidm_pose_map` |
| | `source_keypoints`, `target_keypoints` | [B, 18, 2] | option `keypoints`: (x, y) pixels of S x S after the augmentation |

Training augmentation, as each reference does it: `cfld` flips only the condition image; `fpdm` makes 5 %
identity pairs, draws the source at 256 with p = 0.5, adds N(0, 1) pixel noise to the target keypoints in the
550 x 375 frame and flips source, target and target keypoints together with p = 0.5 (x -> 375 - x, left and
right joints swapped), `fpdm_fusion` not at all; `reposedm` up-scales each image by 1 + U(0, 0.05) and crops back
at a random offset, then flips images and pose maps together with p = 0.5 (pose colours not swapped, as PIDM; the
optional keypoints follow with left and right joints swapped);
`pairs` flips together with p = `flip_prob` (default 0); the PCDMs stages do not augment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from pgpis_jax import levels, poses
from pgpis_jax.errors import UserError
from pgpis_jax.preprocessing import shortest_edge_size
from pgpis_jax.skeleton_resize import SparseResize


class _ImportedOnUse:
    """A module imported at its first attribute access: TensorFlow takes about 2 s to import, which commands that read
    no data (export, inspect, sampling one image) do not pay. `on_import(module)` runs once, right after."""

    def __init__(self, name: str, on_import: Callable = lambda module: None):
        self._name, self._on_import, self._module = name, on_import, None

    def load(self):
        """The module, imported (and `on_import` run) now if that has not happened yet."""
        if self._module is None:
            module = importlib.import_module(self._name)
            self._on_import(module)
            self._module = module
        return self._module

    def __getattr__(self, attribute):
        return getattr(self.load(), attribute)


def _host_only(tensorflow):
    """The pipeline runs on the host CPU: keeps TensorFlow off any accelerator JAX uses."""
    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass


tf = _ImportedOnUse("tensorflow", _host_only)
tfds = _ImportedOnUse("tensorflow_datasets")

IMAGE_KEYS = ("source_image", "target_image")


# ----------------------------------------------------------------------------------------------------------
# TF helpers
# ----------------------------------------------------------------------------------------------------------

def _size(value):
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def decode(encoded, hw):
    """JPEG / PNG bytes -> uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape((*hw, 3))
    return image


def resize(image, hw):
    """uint8 image -> uint8 levels of size `hw`, rounded (half to even) and saturated as a PIL resize of a uint8
    image is. Bicubic (Keys, a = -0.5, as PIL), with the kernel widened by the scale factor when a side shrinks
    (antialiasing, as PIL does); same size: unchanged."""
    size = tuple(image.shape[-3:-1])
    if size == tuple(hw):
        return image
    if None in size or any(o < i for o, i in zip(hw, size)):
        return to_levels(antialiased_resize(image, hw))
    return to_levels(tf.image.resize(image, hw, method="bicubic"))


def antialiased_resize(image, hw):
    """`tf.image.resize(image, hw, "bicubic", antialias=True)` of an [H, W, C] image, bit for bit, in about half
    the CPU time (float32 [*hw, C]). TensorFlow's kernel resizes rows first into a float32 intermediate, then
    columns, each output ((0 + w0 * x0) + w1 * x1) + ... over its taps; its column pass is several times slower
    than its row pass. Here both passes are row passes of the same kernel: the columns' pass runs on the
    transposed intermediate, with the image as one column of W * C channels (a 1 -> 1 column pass multiplies by
    weight 1.0, which changes no bit)."""
    vertical = _resize_rows(image, hw[0])
    resized = tf.transpose(_resize_rows(tf.transpose(vertical, (1, 0, 2)), hw[1]), (1, 0, 2))
    resized.set_shape((*hw, image.shape[-1]))
    return resized


def _resize_rows(image, height):
    """float32 [height, W, C]: `image` [H, W, C] resized along its rows only (bicubic, antialiased)."""
    shape = tf.shape(image)
    columns = tf.reshape(image, (1, shape[0], 1, shape[1] * shape[2]))
    scale = tf.stack([tf.cast(height, tf.float32) / tf.cast(shape[0], tf.float32), 1.0])
    resized = tf.raw_ops.ScaleAndTranslate(images=columns, size=[height, 1], scale=scale, translation=tf.zeros(2),
                                           kernel_type="keyscubic", antialias=True)
    return tf.reshape(resized, (height, shape[1], shape[2]))


def to_levels(image):
    """float32 [0, 255] (a resize output) -> uint8 levels: rounded half to even, saturated. One op: TensorFlow's
    quantize with the range [0, 255] has the scale 1 (the same bits as saturating the rounded value, in one pass
    instead of three)."""
    levels = tf.raw_ops.QuantizeV2(input=image, min_range=0.0, max_range=255.0, T=tf.quint8, mode="SCALED",
                                   round_mode="HALF_TO_EVEN")
    return tf.bitcast(levels.output, tf.uint8)


def _either(condition, if_true, if_false):
    """`if_true` where the scalar `condition` holds, else `if_false` (a branch: a broadcast select copies every
    element through TensorFlow's 6-D block copy)."""
    return tf.cond(condition, lambda: if_true, lambda: if_false)


def _numpy(fn, inputs, shape, dtype="float32"):
    out = tf.numpy_function(fn, inputs, tf.as_dtype(dtype), stateful=False)
    out.set_shape(shape)
    return out


def _seed(seed, k):
    return tf.random.experimental.stateless_fold_in(seed, k)


def _uniform(seed, k, shape=()):
    return tf.random.stateless_uniform(shape, _seed(seed, k), dtype=tf.float32)


def _flip_keypoints_np(kp, offset):
    """Keypoint flip x -> offset - x with left/right swapped (offset = width - 1: pixel mirror; FPDM: width)."""
    flipped = poses.affine_keypoints(kp, scale_x=-1.0, offset_x=float(offset))
    return flipped[list(poses.FLIP_PERMUTATION)]


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """A batch layout: `defaults` options, `make(options, stored_hw, train)` -> preprocess(example, seed) of the
    encoded batch, and `levels`: {field: kind of `pgpis_jax.levels`} of its uint8 level fields."""
    name: str
    defaults: dict
    make: Callable
    levels: Mapping[str, str] = dataclasses.field(default_factory=dict)


CFLD_POSE_PARTS = ("skeleton", "rows", "columns")     # <role>_pose_<part>: `poses.cfld_pose_parts`
PIDM_POSE_PARTS = ("skeleton", "limb_rows")           # <role>_pose_<part>: `poses.pidm_pose_parts`


def decode_batch(layout: str, batch: Mapping, xp=np) -> dict:
    """An encoded batch of `layout` -> the batch this module's table documents: level fields to their values,
    pose parts to pose maps; other fields unchanged. `xp`: numpy, or jax.numpy under jit (the same bits)."""
    out = dict(batch)
    for key, kind in LAYOUTS[layout].levels.items():
        if key in out:
            out[key] = levels.from_levels(out[key], kind, xp)
    for role in ("source", "target"):
        if f"{role}_pose_limb_rows" in out:
            parts = [out.pop(f"{role}_pose_{name}") for name in PIDM_POSE_PARTS]
            out[f"{role}_pose"] = poses.pidm_pose_map_from_parts(*parts, xp=xp)
        elif f"{role}_pose_rows" in out:
            parts = [out.pop(f"{role}_pose_{name}") for name in CFLD_POSE_PARTS]
            out[f"{role}_pose"] = poses.cfld_pose_map_from_parts(*parts, xp=xp)
    return out


def _pairs(o, stored, train):
    hw = _size(o["image_size"] or stored)
    sw = o["stickwidth"] or poses.scaled_width(4, hw[0], 512)
    radius = o["radius"] or sw
    style = o["pose_style"]

    def both(kp, flip):
        kp = poses.resize_keypoints(kp, stored, hw)
        if flip:
            kp = _flip_keypoints_np(kp, hw[1] - 1)
        return kp, poses.draw_skeleton(kp, hw, style, stickwidth=sw, radius=radius)

    def preprocess(ex, seed):
        flip = (_uniform(seed, 0) < o["flip_prob"]) if train else tf.constant(False)
        out = {}
        for role in ("source", "target"):
            image = resize(ex[f"{role}_image"], hw)
            out[f"{role}_image"] = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
            kp, pose = tf.numpy_function(both, [ex[f"{role}_keypoints"], flip], (tf.float32, tf.uint8),
                                         stateful=False)
            kp.set_shape((poses.NUM_KEYPOINTS, 2))
            pose.set_shape((*hw, 3))
            out[f"{role}_keypoints"], out[f"{role}_pose"] = kp, pose
        return out
    return preprocess


def _clip(image, size):
    """The image squashed to the CLIP input size, as levels."""
    return resize(image, _size(size))


def _pcdm_prior(o, stored, train):
    def coords(kp):
        return poses.normalize_keypoints(kp, stored)

    def preprocess(ex, seed):
        out = {}
        for role in ("source", "target"):
            out[f"{role}_clip"] = _clip(ex[f"{role}_image"], o["clip_size"])
            out[f"{role}_pose_coords"] = _numpy(coords, [ex[f"{role}_keypoints"]], (2 * poses.NUM_KEYPOINTS,))
        return out
    return preprocess


def _pcdm_inpaint(o, stored, train):
    s = _size(o["image_size"])
    sw = o["stickwidth"] or poses.scaled_width(4, s[0], 512)

    def skeleton(kp):
        kp = poses.resize_keypoints(kp, stored, s)
        return poses.draw_skeleton(kp, s, "pcdms", stickwidth=sw, radius=sw)

    def preprocess(ex, seed):
        images = [resize(ex[k], s) for k in IMAGE_KEYS]
        pose_maps = [_numpy(skeleton, [ex[f"{r}_keypoints"]], (*s, 3), "uint8") for r in ("source", "target")]
        return {"image": tf.concat(images, axis=1), "pose": tf.concat(pose_maps, axis=1),
                "source_dino": _clip(ex["source_image"], o["clip_size"]),
                "target_clip": _clip(ex["target_image"], o["clip_size"])}
    return preprocess


def pair_stem(source_name, target_name):
    """PCDMs' output name of a pair without extension: "<source stem>_to_<target stem>" (tf strings)."""
    def stem(name):
        return tf.strings.regex_replace(tf.strings.regex_replace(name, r"^.*/", ""), r"\.[^.]*$", "")
    return tf.strings.join([stem(source_name), "_to_", stem(target_name)])


def _pcdm_refine(o, stored, train):
    s = _size(o["image_size"])
    if not o["coarse_dir"]:
        raise UserError("batch layout 'pcdm_refine' needs the option coarse_dir: the folder of stage-2 "
                        "results <source>_to_<target>.png for this split (sample.py --ablation=true --split=train writes it as "
                        "<output_dir>/stage2)")
    coarse_dir = str(o["coarse_dir"]).rstrip("/") + "/"

    def preprocess(ex, seed):
        path = tf.strings.join([coarse_dir, pair_stem(ex["source_name"], ex["target_name"]), ".png"])
        coarse = tf.io.decode_png(tf.io.read_file(path), channels=3)
        return {"target_image": resize(ex["target_image"], s),
                "coarse_image": resize(coarse, s),
                "source_dino": _clip(ex["source_image"], o["clip_size"])}
    return preprocess


def _cfld(o, stored, train):
    s, c, p = _size(o["image_size"]), _size(o["condition_size"]), _size(o["pose_size"])

    def pose_parts(kp):
        return poses.cfld_pose_parts(poses.resize_keypoints(kp, stored, p), p, sigma=o["sigma"])

    def preprocess(ex, seed):
        out = {k: resize(ex[k], s) for k in IMAGE_KEYS}
        cond = resize(ex["source_image"], c)
        if train:
            flip = _uniform(seed, 0) < o["flip_prob"]
            cond = tf.cond(flip, lambda: tf.image.flip_left_right(cond), lambda: cond)
        out["condition_image"] = cond
        for role in ("source", "target"):
            parts = tf.numpy_function(pose_parts, [ex[f"{role}_keypoints"]], (tf.uint8, tf.float32, tf.float32),
                                      stateful=False)
            for name, part, shape in zip(CFLD_POSE_PARTS, parts, [(*p, 3), (p[0], 18), (p[1], 18)]):
                part.set_shape(shape)
                out[f"{role}_pose_{name}"] = part
        if o["reference"]:
            out["reference_image"] = ex["target_image"]
        return out
    return preprocess


def _skeletons_at(canvas, sizes):
    """(draw, inputs) -> levels uint8 [*size, 3] at each of `sizes` of the skeleton `draw(*inputs)` (NumPy, uint8
    [*canvas, 3]): where a size is smaller on both sides, `SparseResize` (built here, eagerly) in the same NumPy
    call (a skeleton is mostly black; it equals `resize` bit for bit at a fraction of its cost), else `resize` of
    the drawn canvas (which then leaves the NumPy call too)."""
    sparse = {i: SparseResize(canvas, size) for i, size in enumerate(sizes) if all(c > t for c, t in zip(canvas, size))}
    shapes = [(*sizes[i], 3) for i in sorted(sparse)]
    if len(sparse) < len(sizes):
        shapes.append((*canvas, 3))

    def levels_at(draw, inputs):
        def draw_and_shrink(*args):
            skeleton = draw(*args)
            return [sparse[i](skeleton) for i in sorted(sparse)] + [skeleton][:len(shapes) - len(sparse)]

        outputs = tf.numpy_function(draw_and_shrink, inputs, [tf.uint8] * len(shapes), stateful=False)
        for output, shape in zip(outputs, shapes):
            output.set_shape(shape)
        shrunk = dict(zip(sorted(sparse), outputs))
        return [shrunk[i] if i in shrunk else resize(outputs[-1], size) for i, size in enumerate(sizes)]
    return levels_at


def _fpdm(o, stored, train):
    out_hw, canvas = _size(o["image_size"]), _size(o["pose_canvas"])
    dino, clip = _size(o["dino_size"]), o["clip_size"]
    ch, cw = canvas
    pose_levels = _skeletons_at(canvas, [out_hw, _size(clip)])

    def pose_image(kp, noise, flip):
        kp = poses.resize_keypoints(kp, stored, canvas)
        lost = poses.missing(kp)
        kp = kp + noise
        kp[lost] = poses.MISSING
        gone = (kp[:, 0] < 0) | (kp[:, 1] < 0)
        kp[gone] = poses.MISSING
        kp[:, 0] = np.where(kp[:, 0] > cw, cw - 1, kp[:, 0])
        kp[:, 1] = np.where(kp[:, 1] > ch, ch - 1, kp[:, 1])
        if flip:
            kp = _flip_keypoints_np(kp, cw)
        return poses.draw_skeleton(kp, canvas, "pidm", stickwidth=o["stickwidth"], radius=o["radius"])

    def preprocess(ex, seed):
        src, tgt = ex["source_image"], ex["target_image"]
        tgt_kp = ex["target_keypoints"]
        noise = tf.zeros((poses.NUM_KEYPOINTS, 2))
        flip = tf.constant(False)
        if train:
            u = _uniform(seed, 0)
            same = u < o["identity_pair_prob"]
            to_source = u < o["identity_pair_prob"] / 2       # target := source, else source := target
            src, tgt, tgt_kp = (_either(same & ~to_source, tgt, src), _either(to_source, src, tgt),
                                _either(to_source, ex["source_keypoints"], tgt_kp))
            noise = o["keypoint_noise"] * tf.random.stateless_normal((poses.NUM_KEYPOINTS, 2), _seed(seed, 1))
            flip = _uniform(seed, 2) < o["flip_prob"]
            low = _uniform(seed, 3) < o["low_res_prob"]
            source = tf.cond(low, lambda: resize(resize(src, _size(o["low_res_size"])), dino),
                             lambda: resize(src, dino))
        else:
            source = resize(src, dino)
        target = resize(tgt, out_hw)
        source = tf.cond(flip, lambda: tf.image.flip_left_right(source), lambda: source)
        target = tf.cond(flip, lambda: tf.image.flip_left_right(target), lambda: target)
        pose, pose_clip = pose_levels(pose_image, [tgt_kp, noise, flip])
        return {"target_image": target, "target_pose": pose, "source_dino": source,
                "source_clip": _clip(source, clip), "target_pose_clip": pose_clip}
    return preprocess


def _fpdm_fusion(o, stored, train):
    """FPDM stage 1 (FusionDataset): CLIPImageProcessor with its centre crop on the photos; the target skeleton
    rendered as the original's pose_img/ files (at the photo's own size, 4 px) and squashed to the CLIP size."""
    clip, canvas = int(o["clip_size"]), _size(o["pose_canvas"])
    resized = shortest_edge_size(*stored, clip)
    top, left = (resized[0] - clip) // 2, (resized[1] - clip) // 2
    pose_levels = _skeletons_at(canvas, [(clip, clip)])

    def pose_image(kp):
        kp = poses.resize_keypoints(kp, stored, canvas)
        return poses.draw_skeleton(kp, canvas, "pidm", stickwidth=o["stickwidth"], radius=o["radius"])

    def center_cropped(image):
        return resize(image, resized)[top:top + clip, left:left + clip]

    def preprocess(ex, seed):
        return {"source_clip": center_cropped(ex["source_image"]), "target_clip": center_cropped(ex["target_image"]),
                "target_pose_clip": pose_levels(pose_image, [ex["target_keypoints"]])[0]}
    return preprocess


def _reposedm(o, stored, train):
    s = _size(o["image_size"])

    def keypoints_and_pose_parts(kp, scale_y, scale_x, top, left, flip):
        kp = poses.resize_keypoints(kp, stored, s)
        kp = poses.crop_keypoints(poses.affine_keypoints(kp, scale_x, scale_y), top, left)
        parts = poses.pidm_pose_parts(kp, s, stickwidth=o["stickwidth"], radius=o["radius"])
        if flip:
            return _flip_keypoints_np(kp, s[1] - 1), *poses.flip_pidm_pose_parts(*parts)
        return kp, *parts

    def preprocess(ex, seed):
        out = {}
        flip = (_uniform(seed, 0) < o["flip_prob"]) if train else tf.constant(False)
        for k, role in enumerate(("source", "target")):
            image = resize(ex[f"{role}_image"], s)
            scale_y = scale_x = tf.constant(1.0)
            top, left = tf.constant(0.0), tf.constant(0.0)
            if train:
                scale = 1.0 + o["scale_jitter"] * _uniform(seed, 1 + 3 * k)
                big = tf.cast(tf.round(scale * np.array(s, np.float32)), tf.int32)
                top = tf.floor(_uniform(seed, 2 + 3 * k) * tf.cast(big[0] - s[0] + 1, tf.float32))
                left = tf.floor(_uniform(seed, 3 + 3 * k) * tf.cast(big[1] - s[1] + 1, tf.float32))
                grown = tf.image.resize(image, big, method="bicubic")
                image = to_levels(tf.image.crop_to_bounding_box(grown, tf.cast(top, tf.int32), tf.cast(left, tf.int32),
                                                                *s))
                scale_y, scale_x = tf.cast(big[0], tf.float32) / s[0], tf.cast(big[1], tf.float32) / s[1]
            kp, skeleton, limb_rows = tf.numpy_function(
                keypoints_and_pose_parts, [ex[f"{role}_keypoints"], scale_y, scale_x, top, left, flip],
                (tf.float32, tf.uint8, tf.int16), stateful=False)
            kp.set_shape((poses.NUM_KEYPOINTS, 2))
            skeleton.set_shape((*s, 3))
            limb_rows.set_shape((len(poses.LIMBS), s[0], 2))
            out[f"{role}_image"] = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
            out[f"{role}_pose_skeleton"], out[f"{role}_pose_limb_rows"] = skeleton, limb_rows
            if o["keypoints"]:
                out[f"{role}_keypoints"] = kp
        return out
    return preprocess


LAYOUTS = {layout.name: layout for layout in (
    Layout("pairs", dict(image_size=None, pose_style="pcdms", stickwidth=None, radius=None, flip_prob=0.0),
           _pairs, dict(source_image="signed", target_image="signed", source_pose="unit", target_pose="unit")),
    Layout("pcdm_prior", dict(clip_size=224), _pcdm_prior, dict(source_clip="clip", target_clip="clip")),
    Layout("pcdm_inpaint", dict(image_size=512, clip_size=224, stickwidth=None), _pcdm_inpaint,
           dict(image="signed", pose="signed", source_dino="clip", target_clip="clip")),
    Layout("pcdm_refine", dict(image_size=512, clip_size=224, coarse_dir=""), _pcdm_refine,
           dict(target_image="signed", coarse_image="signed", source_dino="clip")),
    Layout("cfld", dict(image_size=512, condition_size=256, pose_size=256, sigma=6.0, flip_prob=0.5, reference=False),
           _cfld, dict(source_image="signed", target_image="signed", condition_image="signed",
                       reference_image="signed")),
    Layout("fpdm", dict(image_size=(512, 352), pose_canvas=(550, 375), dino_size=512, clip_size=224,
                        stickwidth=4, radius=4, identity_pair_prob=0.05, low_res_prob=0.5, low_res_size=256,
                        keypoint_noise=1.0, flip_prob=0.5), _fpdm,
           dict(target_image="signed", target_pose="unit", source_dino="imagenet", source_clip="clip",
                target_pose_clip="clip")),
    Layout("fpdm_fusion", dict(clip_size=224, pose_canvas=(1101, 750), stickwidth=4, radius=4), _fpdm_fusion,
           dict(source_clip="clip", target_clip="clip", target_pose_clip="clip")),
    Layout("reposedm", dict(image_size=256, stickwidth=4, radius=4, scale_jitter=0.05, flip_prob=0.5, keypoints=False),
           _reposedm, dict(source_image="signed", target_image="signed")),
)}


def register_layout(layout: Layout) -> None:
    """Adds a batch layout (a method package may define its own); a name already taken is an error."""
    if layout.name in LAYOUTS:
        raise ValueError(f"batch layout {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout


def layout_options(layout, overrides=None):
    """The layout's options with `overrides` applied; unknown names are an error listing the known ones."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown batch layout {layout!r} (config.data.layout); known: {', '.join(LAYOUTS)}")
    options = dict(LAYOUTS[layout].defaults)
    for key, value in dict(overrides or {}).items():
        if key not in options:
            raise UserError(f"unknown option {key!r} of batch layout {layout!r} (config.data.pipeline); known: "
                            f"{', '.join(options)}")
        options[key] = value
    return options


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------

def load_builder(dataset, data_dir=None):
    """A TFDS builder from a builder, a name ("deepfashion/256x176") or a prepared version directory."""
    if isinstance(dataset, tfds.core.DatasetBuilder):
        return dataset
    path = Path(str(dataset))
    if (path / "dataset_info.json").is_file():
        return tfds.builder_from_directory(str(path))
    try:
        builder = tfds.builder(str(dataset), data_dir=data_dir)
    except Exception as e:   # tfds raises several types for a name it cannot find
        raise UserError(f"dataset {dataset!r} not found in {data_dir or 'the default TFDS data_dir'}: build it "
                        f"with `tfds build data/<name>` (see README) ({type(e).__name__}: {e})") from None
    if not builder.is_prepared():
        raise UserError(f"dataset {dataset!r} is not prepared in {builder.data_dir}: run `tfds build`")
    return builder


class InputPipeline:
    """Host-local iterator of batches (dicts of NumPy arrays); see the module docstring."""

    def __init__(self, dataset, *, batch_size, split="train", layout="pairs", options=None, data_dir=None,
                 train=True, seed=0, shuffle_buffer_size=4096, process_index=None, process_count=None,
                 num_parallel_calls=None, prefetch=2, include_names=None, encoded=False, state=None):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} is not in [0, {process_count})")
        if batch_size % process_count:
            raise UserError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
        self.builder = load_builder(dataset, data_dir)
        if split not in self.builder.info.splits:
            raise UserError(f"split {split!r} not in dataset {self.builder.name} (splits: "
                            f"{', '.join(self.builder.info.splits)})")
        self.split, self.train, self.seed = split, bool(train), int(seed)
        self.layout = layout
        self.options = layout_options(layout, options)
        self.batch_size = int(batch_size)
        self.host_batch_size = self.batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.num_parallel_calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
        self.prefetch = prefetch
        self.include_names = (not self.train) if include_names is None else bool(include_names)
        self.encoded = bool(encoded)

        n = self.num_split_examples = self.builder.info.splits[split].num_examples
        start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
        self.host_range = (start, stop) if not self.train else (0, n)
        if self.train:
            self.steps_per_epoch = n // self.batch_size
            if self.steps_per_epoch == 0:
                raise UserError(f"split {split!r} of {self.builder.name} has {n} examples: fewer than one batch "
                                f"of {self.batch_size}")
        else:
            self.steps_per_epoch = math.ceil(math.ceil(n / process_count) / self.host_batch_size)
        shape = self.builder.info.features["source_image"].shape
        self.stored_hw = (int(shape[0]), int(shape[1]))
        self._preprocess = LAYOUTS[layout].make(self.options, self.stored_hw, self.train)
        self._epoch, self._step, self._iterator, self._template = 0, 0, None, None
        if state is not None:
            self.set_state(state)

    # -- state ------------------------------------------------------------------------------------------
    def _identity(self):
        """What a state is valid for: a training position is the same for any number of hosts."""
        identity = {"dataset": self.builder.name, "split": self.split, "num_examples": self.num_split_examples,
                    "seed": self.seed, "batch_size": self.batch_size, "layout": self.layout, "train": self.train}
        if not self.train:
            identity.update(process_index=self.process_index, process_count=self.process_count)
        return identity

    def get_state(self) -> dict:
        """The position of the next batch (epoch, step within the epoch) and what it is valid for."""
        return {"epoch": self._epoch, "step": self._step, **self._identity()}

    def set_state(self, state: dict):
        """Continue from `state` (from `get_state`); it must come from a pipeline with the same setup."""
        mine = self._identity()
        differ = [f"{k} ({state[k]!r} in the state, {mine[k]!r} here)" for k in mine
                  if k in state and state[k] != mine[k]]
        if differ:
            raise UserError("the saved input pipeline state belongs to a different setup: " + ", ".join(differ))
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise UserError(f"input pipeline state epoch {epoch}, step {step} is out of range "
                            f"({self.steps_per_epoch} steps per epoch)")
        self._epoch, self._step, self._iterator = epoch, step, None

    # -- tf.data ----------------------------------------------------------------------------------------
    def _seeds(self, epoch):
        return [int(s) for s in np.random.SeedSequence([self.seed, epoch]).generate_state(3, dtype=np.uint32)]

    def epoch_dataset(self, epoch, start_step=0) -> tf.data.Dataset:
        """The tf.data pipeline of one epoch of this host, from batch `start_step` on."""
        file_seed, shuffle_seed, aug_seed = self._seeds(epoch)
        start, stop = self.host_range
        read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False, skip_prefetch=True,
                                      interleave_cycle_length=4, interleave_block_length=1)
        decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS}
        ds = self.builder.as_dataset(split=f"{self.split}[{start}:{stop}]", shuffle_files=self.train,
                                     decoders=decoders, read_config=read_config)
        hb = self.host_batch_size
        if self.train:
            ds = ds.shuffle(self.shuffle_buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
            ds = ds.take(self.steps_per_epoch * self.batch_size).enumerate().skip(start_step * self.batch_size)
            batch_size, host = self.batch_size, self.process_index
            ds = ds.filter(lambda position, ex: (position % batch_size) // hb == host)
            id_offset = tf.constant(0, tf.int64)
        else:
            ds = ds.enumerate().skip(start_step * hb)
            id_offset = tf.constant(start, tf.int64)
        preprocess, include_names, hw = self._preprocess, self.include_names, self.stored_hw

        def process(position, ex):
            ex = dict(ex)
            for k in IMAGE_KEYS:
                ex[k] = decode(ex[k], hw)
            seed = tf.stack([tf.constant(aug_seed, tf.int64), position])
            out = preprocess(ex, seed)
            if include_names:
                out["source_name"], out["target_name"] = ex["source_name"], ex["target_name"]
            out["mask"] = tf.constant(True)
            out["example_id"] = tf.cast(position + id_offset, tf.int32)
            return out

        ds = ds.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
        ds = ds.batch(hb, drop_remainder=self.train)
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    @property
    def element_spec(self) -> dict:
        """{key: tf.TensorSpec} of one encoded batch (leading dimension host_batch_size)."""
        return self.epoch_dataset(0).element_spec

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    @property
    def device_decode(self):
        """For a pipeline made with `encoded=True`: the JAX function (traceable under jit) from its batches to
        the documented ones, which the trainer applies on the devices; None otherwise."""
        if not self.encoded:
            return None
        import jax.numpy as jnp
        return functools.partial(decode_batch, self.layout, xp=jnp)

    def _empty_batch(self):
        """An encoded batch of no examples (for an evaluation host whose records have run out)."""
        if self._template is None:
            self._template = {k: (s.shape[1:], object if s.dtype == tf.string else s.dtype.as_numpy_dtype)
                              for k, s in self.element_spec.items()}
        return {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in self._template.items()}

    def _padded(self, batch):
        """`batch` filled up to host_batch_size with zeros (b"" for names; `mask` False)."""
        count = self.host_batch_size - len(batch["mask"])
        return {k: np.concatenate([v, np.full((count, *v.shape[1:]), b"" if v.dtype == object else 0, v.dtype)])
                for k, v in batch.items()}

    def __next__(self) -> dict:
        while True:
            if not self.train and self._step >= self.steps_per_epoch:
                raise StopIteration
            if self._iterator is None:
                self._iterator = self.epoch_dataset(self._epoch, self._step).as_numpy_iterator()
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.train:
                    self._epoch, self._step, self._iterator = self._epoch + 1, 0, None
                    continue
                batch = self._empty_batch()
            if not self.encoded:
                batch = decode_batch(self.layout, batch)
            if len(batch["mask"]) < self.host_batch_size:
                batch = self._padded(batch)
            self._step += 1
            return batch

    @property
    def epoch(self):
        return self._epoch


def dataset_name(data_config):
    """TFDS name of a config's `data` section: dataset + image_size -> e.g. "deepfashion/256x176", or
    dataset + `builder_config` when the config names one (e.g. "synthetic_people/64x64_demo")."""
    h, w = (int(v) for v in data_config.image_size)
    return f"{data_config.dataset}/{data_config.get('builder_config') or f'{h}x{w}'}"


def dataset_identity(data_config) -> dict:
    """What the prepared dataset of a config's `data` section is, wherever it lies (data_dir is not part of it):
    the TFDS name, builder config and version, the examples of each split, and a fingerprint (SHA-256, 16 hex
    digits) of the feature spec, the builder's metadata and each split's shard lengths and bytes. A run records
    it, so that resuming or sampling with the data in another folder is allowed and other data is refused."""
    builder = load_builder(dataset_name(data_config), data_config.get("data_dir") or None)
    info = builder.info
    splits = sorted(info.splits.items())
    content = {"features": info.features.to_json(), "metadata": dict(info.metadata or {}),
               "splits": {name: {"shard_lengths": [int(n) for n in split.shard_lengths],
                                 "num_bytes": int(split.num_bytes)} for name, split in splits}}
    fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"dataset": builder.name, "config": builder.builder_config.name if builder.builder_config else "",
            "version": str(info.version), "splits": {name: int(split.num_examples) for name, split in splits},
            "fingerprint": fingerprint}


def from_config(config, *, split="train", train=True, data_dir=None, state=None, **kwargs):
    """The pipeline a trainer config describes: `config.data.dataset` / `image_size` (the stored dataset),
    `config.data.data_dir` (optional), `config.data.layout`, `config.data.pipeline` (optional layout options),
    `config.batch_size`, `config.seed`."""
    data = config.data
    data_dir = data_dir or data.get("data_dir", None)
    options = dict(data.get("pipeline", None) or {})
    return InputPipeline(dataset_name(data), split=split, batch_size=config.batch_size, layout=data.layout,
                         options=options, data_dir=data_dir, train=train, seed=config.seed, state=state, **kwargs)
