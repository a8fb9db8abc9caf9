"""The pair records every TFDS builder in data/ writes, and how they are made from a `formats.SplitSource`.

One record = one (source, target) pair of the split's pair list, in the pair list's order of lines:

| feature | type | meaning |
|---|---|---|
| `source_image`, `target_image` | uint8 `[H, W, 3]` (stored JPEG or PNG) | the image resized (PIL bicubic, aspect not kept, as every reference does) to the config's `H x W`; a file already of that size and format is stored byte for byte |
| `source_keypoints`, `target_keypoints` | float32 `[18, 2]` | OpenPose-18 (x, y) pixels of the stored `H x W` image (the annotation frame scaled by W/W_a, H/H_a); both -1 for a missing joint |
| `source_name`, `target_name` | text | the image names the pair list uses (DeepFashion: DPTN flattened names) |
| `source_person`, `target_person` | text | person identity (`idXXXXXXXX`, Market's 4-digit id, synthetic `idXXXXXXXX`) |
| `pair_index` | int64 | 0-based position of the pair in the split's pair list |

Bad input (missing image, unreadable or truncated image, unparseable keypoints or wrong count, a pair naming an
image without annotation) raises `formats.DataError` naming the file and line, unless `skip_bad_examples`:
then the pairs concerned are left out and `BuildReport` lists each problem once, with how many pairs it cost.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pgpis_jax.datasets import formats

IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG"}


def features(height, width, image_format="jpeg"):
    """The tfds FeaturesDict of a pair record at `height x width`."""
    import tensorflow_datasets as tfds

    image = tfds.features.Image(shape=(height, width, 3), encoding_format=image_format)
    keypoints = tfds.features.Tensor(shape=(formats.NUM_KEYPOINTS, 2), dtype=np.float32)
    return tfds.features.FeaturesDict({
        "source_image": image, "target_image": image,
        "source_keypoints": keypoints, "target_keypoints": keypoints,
        "source_name": tfds.features.Text(), "target_name": tfds.features.Text(),
        "source_person": tfds.features.Text(), "target_person": tfds.features.Text(),
        "pair_index": tfds.features.Scalar(dtype=np.int64),
    })


def encode_image(array_or_pil, image_format="jpeg", jpeg_quality=95) -> bytes:
    """uint8 RGB -> JPEG (4:4:4 chroma, `jpeg_quality`) or PNG bytes."""
    image = array_or_pil if isinstance(array_or_pil, Image.Image) else Image.fromarray(np.asarray(array_or_pil))
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    elif image_format == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image format {image_format!r}: jpeg or png")
    return buffer.getvalue()


def prepare_image(path, hw, image_format="jpeg", jpeg_quality=95) -> bytes:
    """Read, fully decode (so truncated files fail here), resize to `hw` and encode one image.

    Raises DataError naming the file if it is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise formats.DataError(path, f"cannot read image: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            source_format, mode, size = image.format, image.mode, image.size
            rgb = image.convert("RGB")
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise formats.DataError(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    height, width = hw
    if size == (width, height) and mode == "RGB" and source_format == IMAGE_FORMATS[image_format]:
        return data
    if size != (width, height):
        rgb = rgb.resize((width, height), Image.BICUBIC)
    return encode_image(rgb, image_format, jpeg_quality)


@dataclasses.dataclass
class BuildReport:
    """What a split's build left out (skip_bad_examples) and why."""
    split: str
    num_pairs: int = 0
    num_written: int = 0
    problems: list = dataclasses.field(default_factory=list)   # formats.Problem, each once
    pairs_lost: dict = dataclasses.field(default_factory=dict)  # str(problem) -> pairs it removed

    @property
    def num_skipped(self):
        return self.num_pairs - self.num_written

    def summary(self, limit=20):
        lines = [f"split '{self.split}': skipped {self.num_skipped} of {self.num_pairs} pairs because of "
                 f"{len(self.problems)} bad input(s):"]
        for problem in self.problems[:limit]:
            lines.append(f"  {problem} ({self.pairs_lost.get(str(problem), 0)} pair(s))")
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (all listed in the dataset's "
                         "metadata.json under 'skipped')")
        return "\n".join(lines)

    def as_dict(self):
        return {"num_pairs": self.num_pairs, "num_written": self.num_written, "num_skipped": self.num_skipped,
                "problems": [dict(p.as_dict(), pairs_lost=self.pairs_lost.get(str(p), 0))
                             for p in self.problems]}


def _strict_error(error: formats.DataError, pair: formats.Pair):
    """The error to stop with: an image problem also names the pairs-file line that needed the image."""
    if error.line is None and error.path != pair.path:
        return formats.DataError(error.path, f"{error.reason} (needed by {Path(pair.path).name}, line {pair.line})")
    return error


def _problem(error: formats.DataError):
    return formats.Problem(error.path, error.line, error.reason)


def pair_examples(source: formats.SplitSource, hw, *, image_format="jpeg", jpeg_quality=95,
                  skip_bad_examples=False, report: BuildReport | None = None, num_threads=None,
                  chunk_pairs=2048):
    """Yield `(pair_index, record)` for every pair of `source` (see the module docstring).

    Each image is decoded, resized and encoded once, in a thread pool, in a fixed order (pairs in chunks of
    `chunk_pairs`, images sorted by name within a chunk), so the first bad file reported in strict mode does not
    depend on timing; an encoded image is kept only until the last pair that needs it (pair lists group an
    identity's pairs, so few are held). In skip mode `report` is filled in as a side effect.
    """
    strict = not skip_bad_examples
    report = report if report is not None else BuildReport(source.split)
    unparsed_pairs = sum(1 for p in source.problems if p.path == source.pairs_path)
    report.num_pairs = len(source.pairs) + unparsed_pairs
    problems: dict[str, formats.Problem] = {}

    def note(problem, pairs=1):
        key = str(problem)
        if key not in problems:
            problems[key] = problem
            report.problems.append(problem)
        report.pairs_lost[key] = report.pairs_lost.get(key, 0) + pairs

    for problem in source.problems:   # lines the readers could not parse (skip mode only)
        note(problem, pairs=1 if problem.path == source.pairs_path else 0)

    # 1. annotations and image paths of every pair
    name_error: dict[str, formats.DataError | None] = {}
    name_info: dict[str, tuple] = {}

    def check(name):
        if name not in name_error:
            try:
                kp = source.keypoints(name)
                path = source.image_path(name)
                name_info[name] = (kp, path)
                name_error[name] = None
            except formats.DataError as e:
                name_error[name] = e
        return name_error[name]

    valid = []
    for index, pair in enumerate(source.pairs):
        bad = None
        for name in (pair.source, pair.target):
            error = check(name)
            if error is not None:
                if strict:
                    raise _strict_error(error, pair)
                bad = _problem(error)
                break
        if bad is not None:
            note(bad)
        else:
            valid.append((index, pair))

    # 2. images, each decoded once, a chunk of pairs at a time; an image leaves memory after its last pair
    last_use = {}
    for position, (_, pair) in enumerate(valid):
        last_use[pair.source] = last_use[pair.target] = position
    encoded: dict[str, bytes] = {}
    image_error: dict[str, formats.DataError] = {}
    workers = num_threads or min(8, os.cpu_count() or 1)
    ah, aw = source.keypoint_hw
    height, width = hw
    from pgpis_jax import poses

    def load(name):
        try:
            return prepare_image(name_info[name][1], hw, image_format, jpeg_quality), None
        except formats.DataError as e:
            return None, e

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for begin in range(0, len(valid), chunk_pairs):
            chunk = valid[begin:begin + chunk_pairs]
            names = sorted({n for _, pair in chunk for n in (pair.source, pair.target)}
                           - encoded.keys() - image_error.keys())
            try:
                for name, (data, error) in zip(names, pool.map(load, names)):
                    if error is not None:
                        if strict:
                            raise error
                        image_error[name] = error
                    else:
                        encoded[name] = data
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            # 3. records
            for index, pair in chunk:
                failed = [image_error[n] for n in (pair.source, pair.target) if n in image_error]
                if failed:
                    note(_problem(failed[0]))
                    continue
                record = {"pair_index": index}
                for role, name in (("source", pair.source), ("target", pair.target)):
                    kp, _ = name_info[name]
                    record[f"{role}_image"] = encoded[name]
                    record[f"{role}_keypoints"] = poses.resize_keypoints(kp, (ah, aw), (height, width))
                    record[f"{role}_name"] = source.record_name(name)
                    record[f"{role}_person"] = source.person_id(name)
                report.num_written += 1
                yield index, record
            end = begin + len(chunk)
            for name in [n for n in encoded if last_use[n] < end]:
                del encoded[name]

