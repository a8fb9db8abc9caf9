"""Image folders for evaluation: listing them, pairing generated with reference images by file name, reading
RGB images, and the resizers and uint8 quantisers of the papers' evaluation scripts.

Resize kernels (separable; output pixel i samples the input at (i + 0.5) * in / out - 0.5):

| kernel        | as                                             | taps                              | downscale antialias | borders                 | output                     |
|---------------|------------------------------------------------|-----------------------------------|---------------------|-------------------------|----------------------------|
| "none"        | no resize                                      |                                   |                     |                         | the image                  |
| "cv2_cubic"   | cv2.resize INTER_CUBIC on float32 (PCDMs)      | Keys a=-0.75, 4 taps              | no                  | edge pixel repeated     | float, unclipped           |
| "cv2_linear"  | cv2.resize INTER_LINEAR on float32 (PIDM)      | triangle, 2 taps                  | no                  | edge pixel repeated     | float                      |
| "bicubic_aa"  | torch F.interpolate(bicubic, antialias=True)   | Keys a=-0.5 widened by the scale  | yes                 | weights renormalised    | float                      |
| "pil_bicubic" | PIL Image.resize(BICUBIC) of an 8-bit RGB image | as bicubic_aa, 22-bit fixed point | yes                 | weights renormalised    | uint8, rounded, per axis   |

Quantisers after a float kernel: "none" (keep the float values), "floor" (clip to [0, 255], then truncate, as
`(x * 255).clamp(0, 255).to(torch.uint8)` in CFLD). "pil_bicubic" rounds by itself ("round").

Arrays are float32 [H, W, 3] on the 0..255 scale (uint8 values exactly) unless a function says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pgpis_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
KERNELS = ("none", "cv2_cubic", "cv2_linear", "bicubic_aa", "pil_bicubic")
QUANTIZERS = ("none", "floor", "round")
# How a generated file name finds its reference: "name" (same stem), "target_after_to" (PCDMs / PIDM:
# `<src>_to_<tgt>.png` -> reference `<tgt>.*`), or "fpdm" (C2.eval.caculate_metrics.py: `fpdm_key` of both sides,
# the references searched recursively, e.g. the In-shop `img/` tree).
MATCH_RULES = ("name", "target_after_to", "fpdm")
# FPDM's generated names `<source>.jpg_2_<target>.jpg.png`: the target part follows the first extension + "_2_".
_FPDM_PAIR = re.compile(r"\.(?:jpe?g|png)_2_", re.IGNORECASE)
_IMAGE_SUFFIXES = re.compile(r"(?:\.(?:png|jpe?g|bmp|webp))+$", re.IGNORECASE)
# Sub-folders holding several candidates per pair (best-of-N selection): sample_0, sample_1, ...
CANDIDATE_FOLDER = re.compile(r"sample_(\d+)")
# Longest list of file names one error message spells out; the rest are counted.
MAX_LISTED = 20
# PIL's fixed-point precision for 8-bit resampling (Resample.c: PRECISION_BITS = 32 - 8 - 2).
PIL_PRECISION_BITS = 22
# PIL modes read as RGB (converted); anything else (16-bit, CMYK, float) is refused.
READABLE_MODES = ("RGB", "RGBA", "L", "LA", "P")


@dataclasses.dataclass(frozen=True)
class Preparation:
    """How an image file becomes the array a metric sees: resize `kernel` to `size` (height, width), then
    `quantize`. kernel "none" keeps the file's own size (size None)."""

    kernel: str
    size: Optional[Tuple[int, int]]
    quantize: str

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: expected one of {KERNELS}")
        if self.quantize not in QUANTIZERS:
            raise ValueError(f"quantize {self.quantize!r}: expected one of {QUANTIZERS}")
        if (self.kernel == "none") != (self.size is None):
            raise ValueError(f"kernel {self.kernel!r} with size {self.size}: only kernel 'none' has no size")
        if (self.kernel == "pil_bicubic") != (self.quantize == "round"):
            raise ValueError(f"kernel {self.kernel!r} with quantize {self.quantize!r}: 'round' is PIL's 8-bit "
                             "resampling and belongs to kernel 'pil_bicubic' only")
        if self.kernel == "none" and self.quantize != "none":
            raise ValueError("kernel 'none' reads uint8 files and needs no quantizer")

    def output_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(height, width) of the prepared image for a file of `image_size`."""
        return tuple(self.size) if self.size is not None else tuple(image_size)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [h, w, 3] on the 0..255 scale."""
        if self.kernel == "none":
            return image.astype(np.float32)
        resized = resize(image, self.size, self.kernel)
        if self.quantize == "floor":
            resized = np.floor(np.clip(resized, 0.0, 255.0))
        return resized.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Pair:
    """A generated image and its reference. `generated` holds one path per candidate (one, or N for
    best-of-N selection); `name` is the generated file's path relative to its folder."""

    name: str
    generated: Tuple[str, ...]
    reference: str


def listing(items: Sequence[str]) -> str:
    """The first MAX_LISTED items joined with commas, and how many more there are."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def list_images(folder: str, recursive: bool = False) -> List[str]:
    """Sorted paths of the image files (IMAGE_EXTENSIONS, any case) in `folder`, or in its whole tree when
    `recursive`. Names starting with "." are ignored. A missing folder, one without images, sub-folders
    (unless recursive) or files that are not images are one UserError listing them."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder} does not exist or is not a directory")
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not recursive:
            others.extend(os.path.join(root, d) + "/" for d in dirs)
            dirs[:] = []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    if others:
        raise UserError(f"{folder} holds {len(others)} entries that are not image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}): {listing(sorted(others))}")
    if not images:
        raise UserError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(images)


def candidate_folders(generated_dir: str) -> List[str]:
    """The folders holding the generated candidates: [generated_dir] when it holds images, or its sub-folders
    sample_0 ... sample_{N-1} (N candidates per pair, same file names in each) when it holds only those."""
    if not os.path.isdir(generated_dir):
        raise UserError(f"generated folder {generated_dir} does not exist or is not a directory")
    entries = [e for e in os.listdir(generated_dir) if not e.startswith(".")]
    numbered = sorted((int(m.group(1)), e) for e in entries
                      if (m := CANDIDATE_FOLDER.fullmatch(e)) and os.path.isdir(os.path.join(generated_dir, e)))
    if not numbered or len(numbered) != len(entries):
        return [generated_dir]
    if [k for k, _ in numbered] != list(range(len(numbered))):
        raise UserError(f"{generated_dir}: candidate folders must be sample_0 ... sample_{len(numbered) - 1}, "
                        f"found {', '.join(e for _, e in numbered)}")
    return [os.path.join(generated_dir, e) for _, e in numbered]


def fpdm_key(name: str) -> str:
    """FPDM's normalised image name, for a generated file or a reference path relative to the reference folder:
    the part after `<source>.jpg_2_` (generated names), "_vis" dropped, image extensions dropped, "/" and "_"
    removed (so the original's `id_` -> `id` is implied), and a leading "fashion" (the flat DeepFashion names of
    our records) dropped. `MENTees_Tanksid_0000730104_7_additional.jpg_2_MENTees_Tanksid_0000730104_1_front.jpg.png`,
    `MEN/Tees_Tanks/id_00007301/04_1_front.jpg` and `fashionMENTees_Tanksid0000730104_1front.png` all give
    `MENTeesTanksid00007301041front`."""
    name = _FPDM_PAIR.split(name.replace("\\", "/"), maxsplit=1)[-1].replace("_vis", "")
    name = _IMAGE_SUFFIXES.sub("", name).replace("/", "").replace("_", "")
    return name[len("fashion"):] if name.startswith("fashion") else name


def reference_key(generated_name: str, rule: str) -> Optional[str]:
    """The reference key a generated file name (relative path) points to under `rule`, or None."""
    stem = os.path.splitext(os.path.basename(generated_name))[0]
    if rule == "name":
        return stem
    if rule == "target_after_to":
        return stem.rsplit("_to_", 1)[1] if "_to_" in stem else None
    if rule == "fpdm":
        return fpdm_key(os.path.basename(generated_name))
    raise ValueError(f"match rule {rule!r}: expected one of {MATCH_RULES}")


def _reference_keys(reference_dir: str, rule: str) -> List[Tuple[str, str]]:
    """(key, path) of every reference image under `rule` (recursive for "fpdm")."""
    if rule == "fpdm":
        return [(fpdm_key(os.path.relpath(path, reference_dir)), path)
                for path in list_images(reference_dir, recursive=True)]
    return [(os.path.splitext(os.path.basename(path))[0], path) for path in list_images(reference_dir)]


def _check_mode(path: str, image: Image.Image) -> None:
    if image.mode not in READABLE_MODES:
        raise UserError(f"{path}: image mode {image.mode} is not supported (expected 8-bit "
                        f"{', '.join(READABLE_MODES)})")


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file from its header; UserError if it cannot be opened as an image."""
    try:
        with Image.open(path) as image:
            _check_mode(path, image)
            return image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path} cannot be read as an image ({type(error).__name__}: {error})") from None


def image_sizes(paths: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """{path: (height, width)} from the headers; all unreadable files together are one UserError."""
    sizes, unreadable = {}, []
    for path in paths:
        try:
            sizes[path] = image_size(path)
        except UserError as error:
            unreadable.append(str(error))
    if unreadable:
        raise UserError(f"{len(unreadable)} unreadable image files: {'; '.join(unreadable[:MAX_LISTED])}"
                        + (f"; and {len(unreadable) - MAX_LISTED} more" if len(unreadable) > MAX_LISTED else ""))
    return sizes


def match_pairs(generated_folders: Sequence[str], reference_dir: str,
                rule: str) -> Tuple[List[Pair], Dict[str, Tuple[int, int]]]:
    """Pairs every generated image with its reference, sorted by generated name; also {path: (height,
    width)} of every file in the pairs.

    generated_folders: from `candidate_folders`; with several, each must hold the same names. Problems
    (references with the same stem, generated names without a reference, candidate folders that disagree,
    files that cannot be opened) are collected and raised together as one UserError."""
    if rule not in MATCH_RULES:
        raise UserError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")
    references, problems = {}, []
    for key, path in _reference_keys(reference_dir, rule):
        if key in references:
            first, second = (os.path.relpath(p, reference_dir) for p in (references[key], path))
            problems.append(f"{reference_dir} holds two images named {key} ({first}, {second})")
        references[key] = path
    names_per_folder = [[os.path.relpath(p, folder) for p in list_images(folder)] for folder in generated_folders]
    names = names_per_folder[0]
    for folder, other in zip(generated_folders[1:], names_per_folder[1:]):
        differing = sorted(set(names) ^ set(other))
        if differing:
            problems.append(f"candidate folders {generated_folders[0]} and {folder} differ in {len(differing)} "
                            f"names: {listing(differing)}")
    unmatched = [name for name in names if reference_key(name, rule) not in references]
    if unmatched:
        how = {"name": "reference image with the same name",
               "target_after_to": "reference image named after the part following '_to_'",
               "fpdm": "reference image of the same FPDM-normalised name (metrics/images.py fpdm_key)"}[rule]
        problems.append(f"{len(unmatched)} generated images in {generated_folders[0]} have no {how} in "
                        f"{reference_dir}: {listing(unmatched)}")
    pairs = [Pair(name, tuple(os.path.join(folder, name) for folder in generated_folders),
                  references[reference_key(name, rule)]) for name in names if name not in unmatched]
    sizes = {}
    try:
        sizes = image_sizes(sorted({p for pair in pairs for p in pair.generated} | {pair.reference for pair in pairs}))
    except UserError as error:
        problems.append(str(error))
    if problems:
        raise UserError("; ".join(problems))
    return pairs, sizes


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file (converted to RGB); UserError naming the file if it fails to decode."""
    try:
        with Image.open(path) as image:
            _check_mode(path, image)
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path} cannot be decoded ({type(error).__name__}: {error})") from None


# --- resizers ----------------------------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a, at offsets x (float64)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((x - 5.0) * x + 8.0) * x * a - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """[out, in] float64 weights of cv2's INTER_CUBIC / INTER_LINEAR along one axis: taps around the sample
    position, out-of-range taps moved onto the edge pixel, no widening when downscaling."""
    positions = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    if kernel == "cv2_cubic":
        offsets, weight = np.arange(-1, 3), functools.partial(_keys_cubic, a=-0.75)
    else:
        positions = np.clip(positions, 0.0, in_size - 1.0)
        offsets, weight = np.arange(0, 2), _triangle
    first = np.floor(positions).astype(np.int64)
    taps = first[:, None] + offsets[None, :]
    weights = weight(positions[:, None] - taps)
    matrix = np.zeros((out_size, in_size))
    rows = np.repeat(np.arange(out_size), len(offsets))
    np.add.at(matrix, (rows, np.clip(taps, 0, in_size - 1).ravel()), weights.ravel())
    return matrix


@functools.lru_cache(maxsize=32)
def _antialiased_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float64 weights of PIL's / torch's antialiased bicubic (Keys a=-0.5) along one axis: the
    kernel is stretched by the downscale factor, its support cut to whole input pixels around the output
    centre, and each row normalised to sum 1."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        sources = np.arange(first, last)
        weights = _keys_cubic((sources - centre + 0.5) / stretch, a=-0.5)
        total = weights.sum()
        matrix[out, first:last] = weights / total if total != 0.0 else weights
    return matrix


@functools.lru_cache(maxsize=32)
def _pil_fixed_point_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The antialiased weights as PIL's 8-bit path uses them: w * 2^22 rounded half away from zero (float64
    holding integers)."""
    scaled = _antialiased_matrix(in_size, out_size) * float(1 << PIL_PRECISION_BITS)
    return np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5))


def _along_axes(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows [h, H] and cols [w, W] applied to image [H, W, C] -> [h, w, C], float64."""
    x = np.asarray(image, np.float64)
    x = np.einsum("jw,hwc->hjc", cols, x, optimize=True)
    return np.einsum("ih,hjc->ijc", rows, x, optimize=True)


def _pil_pass(image: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """One of PIL's 8-bit resampling passes along `axis` of float64 [H, W, C] integer values: integer
    weights, + 2^21, arithmetic shift by 22 bits, clip to 0..255. float64 holds the sums exactly."""
    if axis == 1:
        summed = np.einsum("jw,hwc->hjc", matrix, image, optimize=True)
    else:
        summed = np.einsum("ih,hwc->iwc", matrix, image, optimize=True)
    shifted = np.floor((summed + float(1 << (PIL_PRECISION_BITS - 1))) / float(1 << PIL_PRECISION_BITS))
    return np.clip(shifted, 0.0, 255.0)


def resize(image: np.ndarray, size: Tuple[int, int], kernel: str) -> np.ndarray:
    """Resizes [H, W, C] to `size` (height, width) with `kernel` (see the module table).

    Float kernels return float64 (cv2 and torch compute in float32: expect differences of ~1e-5 on the 0..255
    scale). "pil_bicubic" takes uint8 and returns uint8 equal to PIL's: horizontal pass first, each pass
    rounded to 8 bits, a pass skipped when its axis keeps its size."""
    height, width = image.shape[:2]
    out_height, out_width = size
    if out_height < 1 or out_width < 1:
        raise ValueError(f"resize to {size}: both sides must be positive")
    if kernel == "pil_bicubic":
        if image.dtype != np.uint8:
            raise ValueError(f"pil_bicubic resizes uint8 images, got {image.dtype}")
        x = image.astype(np.float64)
        if out_width != width:
            x = _pil_pass(x, _pil_fixed_point_matrix(width, out_width), axis=1)
        if out_height != height:
            x = _pil_pass(x, _pil_fixed_point_matrix(height, out_height), axis=0)
        return x.astype(np.uint8)
    if (out_height, out_width) == (height, width):
        return np.asarray(image, np.float64)
    if kernel in ("cv2_cubic", "cv2_linear"):
        rows, cols = _interpolation_matrix(height, out_height, kernel), _interpolation_matrix(width, out_width, kernel)
    elif kernel == "bicubic_aa":
        rows, cols = _antialiased_matrix(height, out_height), _antialiased_matrix(width, out_width)
    else:
        raise ValueError(f"kernel {kernel!r}: expected one of {KERNELS[1:]}")
    return _along_axes(image, rows, cols)
