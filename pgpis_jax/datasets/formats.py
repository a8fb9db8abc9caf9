"""Readers and writers of the pose-transfer annotation layouts the methods' releases use.

Every reader returns keypoints in the conventions of `pgpis_jax.poses`: float32 `[18, 2]` (x, y) pixels of the
layout's annotation frame, -1 for missing joints. What each layout stores, and how it is converted:

| layout | files | keypoints on disk | annotation frame |
|---|---|---|---|
| DPTN / CFLD / NTED DeepFashion (`DeepFashionLayout`) | `MEN/`, `WOMEN/` In-shop trees (or flat `train_highres/`, `test_highres/`, `train/`, `test/` folders), `train.lst`, `test.lst`, `fasion-resize-pairs-{split}.csv` (`from,to`), `fasion-resize-annotation-{split}.csv` | `name: [y0..y17]: [x0..x17]`, ints, -1 missing | 256 x 176 (H x W) |
| PATN / PIDM Market-1501 (`MarketLayout`) | `train/`, `test/` (or `bounding_box_train/`, `bounding_box_test/`), `market-pairs-{split}.csv`, `market-annotation-{split}.csv` | as DeepFashion | 128 x 64 |
| FPDM (`JsonPairsLayout(style="fpdm")`) | `img/<MEN or WOMEN tree>`, `pose/<same tree>/<name>.txt`, `{split}_pairs_data.json` | 18 lines `x y` in a 256 x 256 frame = the 176-wide image padded by 40 columns on the left; `-1 -1` missing | 256 x 176 (x_txt - 40) |
| PCDMs (`JsonPairsLayout(style="pcdms")`) | `{split}_data.json`, images in one folder (`.jpg` names read as `.png`), `normalized_pose_txt/<stem>.txt` | 18 lines `x y`; the released normalisation is unpublished, read as FPDM's frame by default (`pose_frame=`) | 256 x 176 |

DeepFashion images are named everywhere by the DPTN "flattened" name of their In-shop path
(`MEN/Denim/id_00000080/01_1_front.jpg` -> `fashionMENDenimid0000008001_1front.jpg`, `flatten_deepfashion_path`);
the JSON layouts' paths are converted to it, so records name images the same way whatever the layout.

Bad input is reported as `Problem(path, line, reason)`. A reader given `strict=True` raises the first one as
`DataError` (a `UserError` whose message names the file and line); with `strict=False` it collects them in
`SplitSource.problems` and leaves out what they concern.

Keypoints must be finite (NaN / inf are errors naming the file and line). A visible joint outside its image (its
pixel-centre coordinates outside [-0.5, W - 0.5) x [-0.5, H - 0.5)) is an error by default; `OutsideJoints`
("clip": moved to the nearest pixel inside; "drop": marked missing) handles them instead and counts them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from pgpis_jax import poses
from pgpis_jax.errors import UserError

NUM_KEYPOINTS = poses.NUM_KEYPOINTS
DEEPFASHION_ANNOTATION_HW = (256, 176)
MARKET_ANNOTATION_HW = (128, 64)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(UserError):
    """Bad dataset input; the message names the file (and line) and what is wrong."""

    def __init__(self, path, reason, line=None):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(str(Problem(self.path, line, reason)))


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    reason: str

    def __str__(self):
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        return f"{where}: {self.reason}"

    def as_dict(self):
        return {"path": self.path, "line": self.line, "reason": self.reason}


class Problems:
    """Collects problems, or raises the first one when strict."""

    def __init__(self, strict):
        self.strict = strict
        self.items: list[Problem] = []
        self.by_name: dict[str, Problem] = {}   # image name -> the problem that made its annotation unusable

    def add(self, path, reason, line=None, name=None):
        if self.strict:
            raise DataError(path, reason, line)
        problem = Problem(str(path), line, reason)
        if name is None:
            self.items.append(problem)
        else:
            self.by_name.setdefault(name, problem)


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str
    target: str
    path: str          # the pairs file
    line: int          # 1-based line (JSON: 1-based index of the entry)


# ----------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------

def flatten_deepfashion_path(path) -> str:
    """DPTN's flat name of an In-shop image path `<GENDER>/<Category>/id_XXXXXXXX/NN_V_view.jpg`.

    The id folder loses its underscores, the file name keeps only its first underscore, and everything is
    joined after the literal "fashion": `MEN/Denim/id_00000080/01_1_front.jpg` ->
    `fashionMENDenimid0000008001_1front.jpg`. Leading folders before MEN / WOMEN (e.g. `img/`) are ignored.
    """
    parts = Path(str(path).replace("\\", "/")).parts
    for start, part in enumerate(parts):
        if part in ("MEN", "WOMEN"):
            break
    else:
        raise ValueError(f"{path}: not an In-shop path (no MEN/ or WOMEN/ folder)")
    parts = parts[start:]
    if len(parts) != 4:
        raise ValueError(f"{path}: expected <GENDER>/<Category>/<id>/<file>, got {'/'.join(parts)}")
    gender, category, ident, filename = parts
    head, sep, tail = filename.partition("_")
    filename = head + sep + tail.replace("_", "")
    return "fashion" + gender + category + ident.replace("_", "") + filename


def deepfashion_person_id(name) -> str:
    """`idXXXXXXXX` of a flat DeepFashion name (or of an In-shop path), or the name without suffix."""
    match = re.search(r"id_?(\d{8})", str(name))
    return f"id{match.group(1)}" if match else Path(str(name)).stem


def market_person_id(name) -> str:
    """The person id of a Market-1501 file name (`0002_c1s1_000451_03.jpg` -> `0002`)."""
    return Path(str(name)).name.split("_")[0]


# ----------------------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------------------

def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"file not found ({what})")
    return path


def _read_lines(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read: {e}") from None


def read_lst(path) -> list[str]:
    """A `.lst` file: one image name per line (blank lines ignored)."""
    return [line.strip() for line in _read_lines(Path(path)) if line.strip()]


def read_pairs_csv(path, problems: Problems) -> list[Pair]:
    """A pairs CSV with a header naming `from` and `to` columns (an extra leading index column is allowed)."""
    path = Path(path)
    lines = _read_lines(path)
    rows = list(csv.reader(lines))
    if not rows:
        raise DataError(path, "empty file; expected a header with columns 'from' and 'to'", 1)
    header = [h.strip() for h in rows[0]]
    if "from" not in header or "to" not in header:
        raise DataError(path, f"header {rows[0]!r} has no 'from' and 'to' columns", 1)
    i_from, i_to = header.index("from"), header.index("to")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.add(path, f"expected {len(header)} comma-separated fields ({', '.join(header)}), "
                               f"got {len(row)}", number)
            continue
        source, target = row[i_from].strip(), row[i_to].strip()
        if not source or not target:
            problems.add(path, "empty image name", number)
            continue
        pairs.append(Pair(source, target, str(path), number))
    return pairs


def parse_keypoint_list(text, num=NUM_KEYPOINTS) -> list[float]:
    """A JSON list of `num` finite numbers (`"[24, 40, -1, ...]"`); raises ValueError saying what is wrong."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{text.strip()[:60]!r} is not a JSON list of numbers") from None
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{text.strip()[:60]!r} is not a list of numbers")
    if len(values) != num:
        raise ValueError(f"{len(values)} values, expected {num}")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{bad[0]} is not a finite number (coordinates are pixels, -1 for a missing joint)")
    return [float(v) for v in values]


def read_annotation_csv(path, problems: Problems) -> dict[str, tuple[np.ndarray, int]]:
    """A PATN-style annotation file `name:keypoints_y:keypoints_x` -> {name: ((18, 2) x y keypoints, line)}.

    Values -1 mark missing joints (either coordinate -1 makes the joint missing).
    """
    path = Path(path)
    lines = _read_lines(path)
    result: dict[str, tuple[np.ndarray, int]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split(":")
        if number == 1 and parts[0].strip() == "name":
            continue
        if len(parts) != 3:
            problems.add(path, f"expected 3 ':'-separated fields (name, keypoints_y, keypoints_x), got "
                               f"{len(parts)}", number)
            continue
        name = parts[0].strip()
        try:
            ys = parse_keypoint_list(parts[1])
        except ValueError as e:
            problems.add(path, f"keypoints_y of {name}: {e}", number, name=name)
            continue
        try:
            xs = parse_keypoint_list(parts[2])
        except ValueError as e:
            problems.add(path, f"keypoints_x of {name}: {e}", number, name=name)
            continue
        kp = np.stack([np.asarray(xs, np.float32), np.asarray(ys, np.float32)], axis=-1)
        kp[poses.missing(kp)] = poses.MISSING
        if name in result:
            problems.add(path, f"{name} is annotated twice (first on line {result[name][1]})", number)
            continue
        result[name] = (kp, number)
    return result


def read_pairs_json(path, problems: Problems) -> list[Pair]:
    """A JSON list of `{"source_image": ..., "target_image": ...}` objects (PCDMs / FPDM pair lists)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e.msg}", e.lineno) from None
    except OSError as e:
        raise DataError(path, f"cannot read: {e}") from None
    if not isinstance(entries, list):
        raise DataError(path, "expected a JSON list of {\"source_image\", \"target_image\"} objects")
    pairs = []
    for number, entry in enumerate(entries, start=1):
        if not (isinstance(entry, dict) and isinstance(entry.get("source_image"), str)
                and isinstance(entry.get("target_image"), str)):
            problems.add(path, f"entry {number} is not an object with string 'source_image' and 'target_image'",
                         number)
            continue
        pairs.append(Pair(entry["source_image"], entry["target_image"], str(path), number))
    return pairs


def read_keypoint_txt(path, with_lines: bool = False):
    """An 18-line `x y` keypoint file (np.savetxt of an (18, 2) array) -> float32 (18, 2) as written (and, with
    `with_lines`, the 1-based line of each joint).

    Raises DataError naming the file and line for a missing file, a line without two finite numbers, or a
    count other than 18.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "keypoint file not found")
    rows, lines = [], []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(path, f"{line.strip()[:60]!r} is not two numbers 'x y'", number) from None
        if len(values) != 2:
            raise DataError(path, f"expected two numbers 'x y', got {len(values)}", number)
        if not all(math.isfinite(v) for v in values):
            raise DataError(path, f"{line.strip()[:60]!r}: coordinates must be finite numbers (pixels, -1 -1 for "
                                  "a missing joint)", number)
        rows.append(values)
        lines.append(number)
    if len(rows) != NUM_KEYPOINTS:
        raise DataError(path, f"{len(rows)} keypoint lines, expected {NUM_KEYPOINTS}")
    keypoints = np.asarray(rows, np.float32)
    return (keypoints, lines) if with_lines else keypoints


OUTSIDE_POLICIES = ("error", "clip", "drop")


@dataclasses.dataclass
class OutsideJoints:
    """What to do with a visible joint outside its image, and how many it changed: "error" (a DataError naming
    the file, line and joint), "clip" (moved to the nearest pixel inside), "drop" (marked missing, -1)."""

    policy: str = "error"
    joints: int = 0     # joints clipped or dropped
    images: int = 0     # images with at least one

    def __post_init__(self):
        if self.policy not in OUTSIDE_POLICIES:
            raise UserError(f"joints outside the image: {self.policy!r}; expected one of "
                            f"{', '.join(OUTSIDE_POLICIES)}")

    def apply(self, keypoints, hw, path, lines=None) -> np.ndarray:
        """`keypoints` (18, 2) x y of an image of size `hw` (height, width) with the policy applied. lines: the
        line of the image's annotation (int) or of each joint (a list), for the error."""
        kp = np.array(keypoints, np.float32)
        height, width = hw
        x, y = kp[:, 0], kp[:, 1]
        outside = poses.visible(kp) & ((x < -0.5) | (x >= width - 0.5) | (y < -0.5) | (y >= height - 0.5))
        if not outside.any():
            return kp
        joint = int(np.argmax(outside))
        if self.policy == "error":
            line = lines[joint] if isinstance(lines, (list, tuple)) else lines
            more = int(outside.sum()) - 1
            raise DataError(path, f"joint {joint} ({poses.JOINT_NAMES[joint]}) at x={x[joint]:g}, y={y[joint]:g} is "
                                  f"outside the {height} x {width} (H x W) image{f' (and {more} more)' if more else ''}"
                                  "; clip or drop such joints with the joints_outside_image option (README, "
                                  "Reliability)", line)
        if self.policy == "clip":
            kp[outside] = np.stack([np.clip(x[outside], 0, width - 1), np.clip(y[outside], 0, height - 1)], -1)
        else:
            kp[outside] = poses.MISSING
        self.joints += int(outside.sum())
        self.images += 1
        return kp

    def summary(self, where: str) -> str:
        verb = "clipped" if self.policy == "clip" else "dropped"
        return f"{where}: {verb} {self.joints} joint(s) outside the image in {self.images} image(s)"

    def as_dict(self) -> dict:
        return {"policy": self.policy, "joints": self.joints, "images": self.images}


# ----------------------------------------------------------------------------------------------------------
# Writers (used by the synthetic generator, the benchmark and the tests)
# ----------------------------------------------------------------------------------------------------------

def _ints(values):
    return "[" + ", ".join(str(int(round(float(v)))) for v in values) + "]"


def write_annotation_csv(path, annotations):
    """{name: (18, 2) x y keypoints} -> `name:keypoints_y:keypoints_x` lines with int lists, -1 missing."""
    lines = ["name:keypoints_y:keypoints_x"]
    for name, kp in annotations.items():
        kp = np.asarray(kp, np.float32).copy()
        kp[poses.missing(kp)] = poses.MISSING
        lines.append(f"{name}: {_ints(kp[:, 1])}: {_ints(kp[:, 0])}")
    Path(path).write_text("\n".join(lines) + "\n")


def write_pairs_csv(path, pairs):
    Path(path).write_text("from,to\n" + "".join(f"{s},{t}\n" for s, t in pairs))


def write_lst(path, names):
    Path(path).write_text("".join(f"{n}\n" for n in names))


def write_pairs_json(path, pairs):
    Path(path).write_text(json.dumps([{"source_image": s, "target_image": t} for s, t in pairs], indent=1))


def write_keypoint_txt(path, keypoints):
    np.savetxt(path, np.asarray(keypoints, np.float64))


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SplitSource:
    """Everything a builder needs to write one split's pair records.

    `keypoints(name)` returns (18, 2) x y keypoints in `keypoint_hw` or raises DataError; `image_path(name)`
    returns the file or raises DataError. `problems` holds the lines the readers could not use (strict=False;
    unusable annotations are raised again by `keypoints` for the pairs that need them). `outside` applies the
    policy for joints outside the image in `keypoints` and counts what it changed.
    """
    split: str
    pairs_path: str
    pairs: list[Pair]
    keypoint_hw: tuple[int, int]
    keypoints: Callable[[str], np.ndarray]
    image_path: Callable[[str], Path]
    person_id: Callable[[str], str]
    record_name: Callable[[str], str]
    problems: list[Problem]
    info: dict
    outside: OutsideJoints = dataclasses.field(default_factory=OutsideJoints)


def _annotation_lookup(annotations, problems: Problems, ann_path, hw, outside: OutsideJoints):
    checked = {}

    def keypoints(name):
        if name in annotations:
            if name not in checked:
                kp, line = annotations[name]
                checked[name] = outside.apply(kp, hw, ann_path, line)
            return checked[name]
        if name in problems.by_name:
            p = problems.by_name[name]
            raise DataError(p.path, p.reason, p.line)
        raise DataError(ann_path, f"no annotation for {name}")
    return keypoints


def _index_images(folder: Path, flatten) -> dict[str, Path]:
    index = {}
    if folder.is_dir():
        for dirpath, _, files in os.walk(folder):
            for file in files:
                if file.lower().endswith(IMAGE_SUFFIXES):
                    full = Path(dirpath) / file
                    index.setdefault(flatten(full), full)
    return index


class DeepFashionLayout:
    """The DPTN / CFLD / NTED DeepFashion In-shop layout under `root` (see the module docstring)."""

    name = "dptn"

    def __init__(self, root, annotation_hw=DEEPFASHION_ANNOTATION_HW):
        self.root = Path(root)
        self.annotation_hw = tuple(annotation_hw)
        self._tree_index = None

    @staticmethod
    def detect(root) -> bool:
        root = Path(root)
        return any((root / f"{p}-resize-pairs-train.csv").is_file() for p in ("fasion", "fashion"))

    def _file(self, kind, split):
        for prefix in ("fasion", "fashion"):   # DPTN's files (and CFLD's code) spell it "fasion"
            path = self.root / f"{prefix}-resize-{kind}-{split}.csv"
            if path.is_file():
                return path
        return _require(self.root / f"fasion-resize-{kind}-{split}.csv", f"the DeepFashion {kind} of split "
                                                                          f"'{split}'")

    def _image_index(self, split):
        if self._tree_index is None:
            tree = {}
            for gender in ("MEN", "WOMEN"):
                def flatten(p, root=self.root):
                    return flatten_deepfashion_path(p.relative_to(root))
                tree.update(_index_images(self.root / gender, flatten))
            self._tree_index = tree
        index = dict(self._tree_index)
        for folder in (f"{split}_highres", split):
            for name, path in _index_images(self.root / folder, lambda p: p.name).items():
                index.setdefault(name, path)
        return index

    def split(self, split, *, strict=True, outside="error") -> SplitSource:
        """The split's pairs; `outside`: the policy for joints outside the image (OutsideJoints)."""
        problems, outside = Problems(strict), OutsideJoints(outside)
        pairs_path, ann_path = self._file("pairs", split), self._file("annotation", split)
        pairs = read_pairs_csv(pairs_path, problems)
        annotations = read_annotation_csv(ann_path, problems)
        index = self._image_index(split)
        if not index:
            raise DataError(self.root, "no images found: expected the In-shop MEN/ and WOMEN/ trees (or flat "
                                       f"{split}_highres/ or {split}/ folders)")
        lst = self.root / f"{split}.lst"
        info = {"layout": self.name, "lst_images": len(read_lst(lst)) if lst.is_file() else None}
        where = f"{self.root}/MEN, {self.root}/WOMEN (as flattened names), {split}_highres/ or {split}/"

        keypoints = _annotation_lookup(annotations, problems, ann_path, self.annotation_hw, outside)

        def image_path(name):
            if name not in index:
                raise DataError(self.root / name, f"image not found under {where}")
            return index[name]

        return SplitSource(split, str(pairs_path), pairs, self.annotation_hw, keypoints, image_path,
                           deepfashion_person_id, lambda n: n, problems.items, info, outside)


class MarketLayout:
    """The PATN / PIDM Market-1501 layout under `root` (see the module docstring)."""

    name = "patn_market"

    def __init__(self, root, annotation_hw=MARKET_ANNOTATION_HW):
        self.root = Path(root)
        self.annotation_hw = tuple(annotation_hw)

    def split(self, split, *, strict=True, outside="error") -> SplitSource:
        """The split's pairs; `outside`: the policy for joints outside the image (OutsideJoints)."""
        problems, outside = Problems(strict), OutsideJoints(outside)
        pairs_path = _require(self.root / f"market-pairs-{split}.csv", f"the Market-1501 pairs of '{split}'")
        ann_path = _require(self.root / f"market-annotation-{split}.csv",
                            f"the Market-1501 annotation of '{split}'")
        pairs = read_pairs_csv(pairs_path, problems)
        annotations = read_annotation_csv(ann_path, problems)
        folders = [self.root / split, self.root / f"bounding_box_{split}"]
        if not any(f.is_dir() for f in folders):
            raise DataError(folders[0], f"image folder not found (expected {split}/ or bounding_box_{split}/)")

        keypoints = _annotation_lookup(annotations, problems, ann_path, self.annotation_hw, outside)

        def image_path(name):
            for folder in folders:
                if (folder / name).is_file():
                    return folder / name
            raise DataError(folders[0] / name, f"image not found (looked in {', '.join(map(str, folders))})")

        return SplitSource(split, str(pairs_path), pairs, self.annotation_hw, keypoints, image_path,
                           market_person_id, lambda n: n, problems.items, {"layout": self.name}, outside)


class JsonPairsLayout:
    """PCDMs / FPDM layouts: JSON pair lists and one `x y` keypoint txt file per image.

    `pose_frame` = (height, width, x_offset) of the txt coordinates: x_annotation = x_txt - x_offset, in the
    256 x 176 DeepFashion frame. The default (256, 256, 40) is FPDM's (PIDM's) padded frame.
    """

    def __init__(self, root, style="fpdm", pose_frame=(256, 256, 40), image_dir=None):
        if style not in ("fpdm", "pcdms"):
            raise ValueError(f"unknown JSON layout style {style!r} (fpdm or pcdms)")
        self.root, self.style = Path(root), style
        self.name = style
        self.pose_frame = tuple(pose_frame)
        self.image_dir = image_dir
        self.annotation_hw = (pose_frame[0], pose_frame[1] - 2 * pose_frame[2])

    @staticmethod
    def detect(root):
        root = Path(root)
        if (root / "train_pairs_data.json").is_file():
            return "fpdm"
        if (root / "train_data.json").is_file():
            return "pcdms"
        return None

    def _pcdms_image_dir(self, split):
        if self.image_dir:
            return self.root / self.image_dir
        for candidate in (f"{split}_lst_512_png", f"{split}_lst_256_png", "all_data_png", "train_all_png"):
            if (self.root / candidate).is_dir():
                return self.root / candidate
        raise DataError(self.root, f"no image folder: expected {split}_lst_512_png/, {split}_lst_256_png/, "
                                   "all_data_png/ or train_all_png/")

    def split(self, split, *, strict=True, outside="error") -> SplitSource:
        """The split's pairs; `outside`: the policy for joints outside the image (OutsideJoints)."""
        problems, outside = Problems(strict), OutsideJoints(outside)
        if self.style == "fpdm":
            pairs_path = _require(self.root / f"{split}_pairs_data.json", f"the FPDM pairs of '{split}'")
        else:
            pairs_path = _require(self.root / f"{split}_data.json", f"the PCDMs pairs of '{split}'")
            image_dir = self._pcdms_image_dir(split)
        pairs = read_pairs_json(pairs_path, problems)
        _, _, x_offset = self.pose_frame

        if self.style == "fpdm":
            def rel(name):
                return Path(name[2:] if name.startswith("./") else name)

            def image_path(name):
                path = self.root / rel(name)
                if not path.is_file():
                    raise DataError(path, "image not found")
                return path

            def txt_path(name):
                parts = rel(name).parts
                parts = ("pose",) + parts[1:] if parts and parts[0] == "img" else parts
                return (self.root / Path(*parts)).with_suffix(".txt")

            def record_name(name):
                try:
                    return flatten_deepfashion_path(rel(name))
                except ValueError:
                    return str(rel(name))
        else:
            def image_path(name):
                path = image_dir / Path(name).with_suffix(".png").name
                if not path.is_file():
                    raise DataError(path, "image not found")
                return path

            def txt_path(name):
                return self.root / "normalized_pose_txt" / (Path(name).stem + ".txt")

            def record_name(name):
                return Path(name).name

        cache = {}

        def keypoints(name):
            if name not in cache:
                kp, lines = read_keypoint_txt(txt_path(name), with_lines=True)
                gone = (kp[:, 0] == poses.MISSING) | (kp[:, 1] == poses.MISSING)
                kp = np.stack([kp[:, 0] - x_offset, kp[:, 1]], axis=-1).astype(np.float32)
                kp[gone] = poses.MISSING
                cache[name] = outside.apply(kp, self.annotation_hw, txt_path(name), lines)
            return cache[name]

        return SplitSource(split, str(pairs_path), pairs, self.annotation_hw, keypoints, image_path,
                           deepfashion_person_id, record_name, problems.items, {"layout": self.name}, outside)


def deepfashion_layout(root, layout="auto"):
    """The DeepFashion layout under `root`: "dptn", "fpdm", "pcdms", or "auto" (detected from the files)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "manual_dir not found (the DeepFashion download; see data/deepfashion/README.md)")
    if layout == "auto":
        if DeepFashionLayout.detect(root):
            layout = "dptn"
        else:
            layout = JsonPairsLayout.detect(root)
        if layout is None:
            raise DataError(root, "no DeepFashion layout recognised: expected fasion-resize-pairs-train.csv "
                                  "(DPTN / CFLD), train_pairs_data.json (FPDM) or train_data.json (PCDMs)")
    if layout == "dptn":
        return DeepFashionLayout(root)
    if layout in ("fpdm", "pcdms"):
        return JsonPairsLayout(root, style=layout)
    raise ValueError(f"unknown DeepFashion layout {layout!r}: auto, dptn, fpdm or pcdms")
