"""Sampling every pair of a split, for any method: a method gives `generate(batch, rng) -> Generated` (images per
output folder, optional per-pair scores) and the batches (with source_name, target_name and mask); this module
writes the images, resumes, shards over processes and gathers the totals.

    <output_dir>/<folder>/<source stem>_to_<target stem>.png    one file per pair and folder (uint8; a method may
                                                                name a folder's files otherwise, `naming`)
    <output_dir>/scores.<process>.json                          per-pair scores (e.g. the prior's cosine), kept
                                                                across resumed runs
    <output_dir>/sample_config.json                             the settings the images were sampled with
    <output_dir>/results.json                                   totals over all processes (process 0 writes it)

Each process runs its own slice of the split (the input pipeline shards by process). A batch whose images all
exist, decode and have the expected size, and whose scores exist, is skipped, so an interrupted run continues where
it stopped; a broken image (truncated, empty, another size) is generated again. Every file is written under a
temporary name and renamed. An output directory belongs to one set of sampling settings: resuming into it with
others is refused before anything is written. `oracle_best_of` is PCDMs' best-of-N selection (highest SSIM against
the ground truth), for methods whose protocol scores it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from PIL import Image

from pgpis_jax.errors import UserError
from pgpis_jax.evaluation import write_results
from pgpis_jax.methods.common.hosts import summed_over_processes
from pgpis_jax.metrics import protocols
from pgpis_jax.trainer.checkpoints import describe_differences, differing_keys

# PCDMs' selection SSIM: Gaussian sigma 1.2, population covariance, data range of the candidate, uint8 scale.
ORACLE_SSIM = protocols.PCDMS.oracle_ssim
RESULTS_FILE = "results.json"
SETTINGS_FILE = "sample_config.json"


@dataclasses.dataclass
class Generated:
    """What `generate` returns for one batch: {folder: images [B, S, S, 3] in [-1, 1]} and {score: [B]}."""

    images: Dict[str, Any]
    scores: Dict[str, Any] = dataclasses.field(default_factory=dict)


def pair_stem(source_name, target_name) -> str:
    """"<source stem>_to_<target stem>" of two record names (bytes or str): the original's output name."""
    def stem(name):
        name = name.decode() if isinstance(name, bytes) else str(name)
        return os.path.splitext(os.path.basename(name))[0]
    return f"{stem(source_name)}_to_{stem(target_name)}"


def to_uint8(image) -> np.ndarray:
    """[-1, 1] float -> uint8, rounded (as the original's x/2 + 0.5, clamp, x 255, round)."""
    return np.round(np.clip(np.asarray(image, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def save_png_atomic(path: str, image) -> None:
    """An image [H, W, 3] in [-1, 1] as a PNG at `path`, written under a temporary name and renamed."""
    Image.fromarray(to_uint8(image)).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def intact_image(path: str, hw: Optional[Tuple[int, int]] = None) -> bool:
    """True if the image file at `path` exists, decodes to its end (PIL's verify: structure and checksums) and,
    when `hw` (height, width) is given, has that size."""
    try:
        with Image.open(path) as image:
            if hw is not None and image.size != (hw[1], hw[0]):
                return False
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def save_images(folder: str, names, images, keep=lambda path: os.path.exists(path)) -> int:
    """Writes images [N, H, W, 3] in [-1, 1] as folder/<name>.png, keeping the files for which keep(path) holds
    (default: the files that exist); returns the count written."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    for name, image in zip(names, images):
        path = os.path.join(folder, f"{name}.png")
        if not keep(path):
            save_png_atomic(path, image)
            written += 1
    return written


def check_settings(output_dir: str, settings: Mapping[str, Any]) -> None:
    """UserError if <output_dir>/sample_config.json records other values for any top-level key of `settings`
    (images sampled with other settings are there: a resumed run would mix them). Reads only."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}); it records how the images there were sampled: use "
                        "another --output_dir") from None
    given = json.loads(json.dumps(dict(settings)))
    keys = differing_keys({k: recorded.get(k) for k in given}, given)
    if keys:
        raise UserError(f"--output_dir={output_dir} holds images sampled with other settings: "
                        f"{describe_differences(recorded, given, keys)}; use another --output_dir (or the same "
                        "settings to resume)")


def oracle_choice(candidates, truth) -> np.ndarray:
    """Index [B] of the candidate [N, B, S, S, 3] in [-1, 1] of highest SSIM against truth [B, S, S, 3], both
    as saved (uint8), with the SSIM of PCDMs' scripts (ORACLE_SSIM)."""
    count, batch = candidates.shape[:2]
    generated = to_uint8(candidates).reshape((count * batch,) + candidates.shape[2:]).astype(np.float64)
    reference = np.tile(to_uint8(truth).astype(np.float64), (count, 1, 1, 1))
    return np.argmax(ORACLE_SSIM.score(generated, reference).reshape(count, batch), axis=0)


def oracle_best_of(draw: Callable[[Any], Any], truth, count: int, rng) -> Tuple[np.ndarray, np.ndarray]:
    """(chosen [B, ...], candidates [count, B, ...]): `count` draws draw(fold_in(rng, k)) of images in [-1, 1]
    and, per pair, the one of highest oracle SSIM against truth [B, ...]."""
    candidates = np.stack([np.asarray(draw(jax.random.fold_in(rng, k))) for k in range(count)])
    chosen = oracle_choice(candidates, np.asarray(truth))
    return candidates[chosen, np.arange(len(chosen))], candidates


def candidate_folders(folder: str, count: int) -> list:
    """The folders of best-of-N candidates of `folder`: <folder>_candidates/sample_<k>."""
    return [f"{folder}_candidates/sample_{k}" for k in range(count)]


class SplitSampler:
    """Writes `folders` (relative to output_dir) and `scores` for every pair of the batches it is given, images of
    `image_hw` (height, width; None: any size), recording `settings` (JSON-able, e.g. the config and options the
    images depend on) in sample_config.json.

    naming: {folder: name(source_name, target_name) -> file stem} for folders named otherwise than `pair_stem`
    (FPDM's `<source>_2_<target>`, a reference folder of targets); scores are kept under pair_stem."""

    def __init__(self, output_dir: str, folders: Sequence[str], scores: Sequence[str] = (),
                 image_hw: Optional[Tuple[int, int]] = None, settings: Optional[Mapping[str, Any]] = None,
                 naming: Mapping[str, Callable[[Any, Any], str]] = ()):
        self.output_dir, self.folders, self.scores = output_dir, tuple(folders), tuple(scores)
        self.image_hw, self.settings = image_hw, dict(settings or {})
        self.naming = dict(naming)
        self.scores_path = os.path.join(output_dir, f"scores.{jax.process_index()}.json")

    def _names(self, folder: str, batch, real) -> list:
        name = self.naming.get(folder, pair_stem)
        return [name(s, t) for s, t, r in zip(batch["source_name"], batch["target_name"], real) if r]

    def _recorded_scores(self) -> Dict[str, Dict[str, float]]:
        if not os.path.exists(self.scores_path):
            return {name: {} for name in self.scores}
        with open(self.scores_path) as f:
            recorded = json.load(f)
        return {name: recorded.get(name, {}) for name in self.scores}

    def _intact(self, path: str) -> bool:
        return intact_image(path, self.image_hw)

    def _finished(self, batch, real, scores) -> Tuple[bool, int]:
        """(every image of the batch's real pairs intact and every score recorded, the count of images there but
        broken)."""
        paths = [os.path.join(self.output_dir, folder, f"{name}.png") for folder in self.folders
                 for name in self._names(folder, batch, real)]
        broken = sum(1 for path in paths if os.path.exists(path) and not self._intact(path))
        images = not broken and all(os.path.exists(path) for path in paths)
        names = self._names("", batch, real)
        return images and all(name in scores[score] for score in self.scores for name in names), broken

    def run(self, batches: Iterable[Mapping[str, Any]], generate: Callable[[Mapping[str, Any], Any], Generated],
            rng, info: Mapping[str, Any] = ()) -> Dict[str, Any]:
        """Generates every batch not yet finished (batch `index` with fold_in(rng, index)) and returns the
        results over all processes (also written to results.json by process 0): `info`, images_written (of which
        broken_replaced were there but broken), pairs, folders, and the mean of each score with its pair count."""
        check_settings(self.output_dir, self.settings)
        os.makedirs(self.output_dir, exist_ok=True)
        if jax.process_index() == 0 and self.settings:
            write_results(self.settings, os.path.join(self.output_dir, SETTINGS_FILE))
        scores = self._recorded_scores()
        written = pairs = replaced = 0
        for index, batch in enumerate(batches):
            real = np.asarray(batch["mask"])
            names = self._names("", batch, real)
            pairs += len(names)
            finished, broken = self._finished(batch, real, scores)
            if finished:
                continue
            replaced += broken
            out = generate(batch, jax.random.fold_in(rng, index))
            for folder in self.folders:
                images = np.asarray(out.images[folder])[real]
                written += save_images(os.path.join(self.output_dir, folder), self._names(folder, batch, real),
                                       images, keep=self._intact)
            if self.scores:
                for score in self.scores:
                    scores[score].update((n, float(v)) for n, v in zip(names, np.asarray(out.scores[score])[real]))
                write_results(scores, self.scores_path)
        sums = [written, pairs, replaced]
        for score in self.scores:
            sums += [sum(scores[score].values()), len(scores[score])]
        totals = summed_over_processes(sums)
        results = dict(info, images_written=int(totals[0]), pairs=int(totals[1]), broken_replaced=int(totals[2]),
                       folders={folder: os.path.join(self.output_dir, folder) for folder in self.folders})
        for k, score in enumerate(self.scores):
            total, count = totals[3 + 2 * k], totals[4 + 2 * k]
            results[score] = float(total / count) if count else None
            results[f"{score}_pairs"] = int(count)
        if jax.process_index() == 0:
            write_results(results, os.path.join(self.output_dir, RESULTS_FILE))
        return results
