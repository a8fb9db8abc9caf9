"""Scores generated images against reference images: FID, LPIPS, SSIM, PSNR under an evaluation protocol.

    results = score_folders("runs/x/generated", "data/test_256", "fid,lpips,ssim,psnr", "cfld",
                            real_dir="data/train_256", weights_dir="weights")
    print(format_table(results))

The protocols (pgpis_jax.metrics.protocols) say how files become arrays and which variant of each metric is
computed. Per-image values are averaged over the pairs. FID statistics of the real set are cached as .npz
files in `stats_cache_dir` (keyed by the protocol, the network and the real folder's file names, sizes and
modification times), never inside the image folders. Methods call `evaluate_method_outputs` after writing
their test-set images; `default_eval_config()` lists the `config.eval` fields it reads.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from absl import logging

from pgpis_jax.errors import UserError
from pgpis_jax.metrics import images, protocols
from pgpis_jax.metrics.images import Pair, Preparation

METRICS = ("fid", "lpips", "ssim", "psnr")
DEFAULT_METRICS = ",".join(METRICS)
BATCH_SIZE = 32
LOADER_THREADS = min(8, os.cpu_count() or 1)
RESULTS_FILE = "metrics.json"
STATS_CACHE_SUBDIR = "fid_stats"

FeatureFn = Callable[[np.ndarray], np.ndarray]        # [N, H, W, 3] in [0, 1] -> [N, D]
DistanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]   # two [N, H, W, 3] -> [N]


def default_eval_config() -> ml_collections.ConfigDict:
    """The `config.eval` fields `evaluate_method_outputs` reads ("" = unset):

    metrics      comma-separated subset of fid, lpips, ssim, psnr
    protocol     a pgpis_jax.metrics.protocols preset: standard, pcdms, cfld, fpdm, pidm
    eval_size    HEIGHTxWIDTH overriding the paper protocol's evaluation size, e.g. 512x352
    real_dir     folder of the FID real images (the training images for pcdms, cfld, pidm)
    weights_dir  folder holding the metric networks' weight files (else $PGPIS_METRIC_WEIGHTS, torch's cache)
    """
    return ml_collections.ConfigDict(dict(metrics=DEFAULT_METRICS, protocol="standard", eval_size="", real_dir="",
                                          weights_dir=""))


def parse_metrics(metrics) -> Tuple[str, ...]:
    """"fid,ssim" or a sequence of names -> the names in METRICS order; UserError for unknown or none."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise UserError(f"metrics {', '.join(unknown) or '(none)'} unknown; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


# --- loading in batches --------------------------------------------------------------------------------------


def _batches(items: Sequence, load: Callable, batch_size: int) -> Iterator[Tuple[list, list]]:
    """(items, loaded) in batches of up to `batch_size` whose loaded arrays share their shapes; loads run in
    threads, one batch ahead."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(LOADER_THREADS) as pool:
        pending = [pool.submit(load, item) for item in chunks[0]] if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            if index + 1 < len(chunks):
                pending = [pool.submit(load, item) for item in chunks[index + 1]]
            start = 0
            for end in range(1, len(chunk) + 1):
                if end == len(chunk) or _shapes(loaded[end]) != _shapes(loaded[start]):
                    yield list(chunk[start:end]), loaded[start:end]
                    start = end


def _shapes(loaded) -> tuple:
    return tuple(np.shape(a) for a in loaded) if isinstance(loaded, tuple) else np.shape(loaded)


def _prepared(path: str, preparation: Preparation) -> np.ndarray:
    return preparation.apply(images.read_rgb(path))


def _whole_batches(names: Sequence[str], batch: int, what: str, protocol_name: str) -> int:
    """How many of the (sorted) items the protocol's script uses: floor(len / batch) * batch (batch 0: all).
    The ones left out are logged by name."""
    if not batch:
        return len(names)
    kept = len(names) // batch * batch
    if not kept:
        raise UserError(f"protocol {protocol_name} uses {what} in whole batches of {batch} only, and there are "
                        f"{len(names)}")
    if kept < len(names):
        logging.info("%s: protocol %s uses %d of %d (whole batches of %d); left out: %s", what, protocol_name,
                     kept, len(names), batch, ", ".join(names[kept:]))
    return kept


# --- checks before any computation ---------------------------------------------------------------------------


def _check_sizes(pairs: Sequence[Pair], sizes: Dict[str, Tuple[int, int]], generated: Preparation,
                 reference: Preparation, what: str, min_side: int = 1) -> None:
    """Prepared generated and reference images of every pair must have one size, of at least min_side
    pixels a side. sizes: {path: (height, width)} of the files."""
    differing, small = [], []
    for pair in pairs:
        reference_size = reference.output_size(sizes[pair.reference])
        for path in pair.generated:
            generated_size = generated.output_size(sizes[path])
            if generated_size != reference_size:
                differing.append(f"{path} {generated_size[0]}x{generated_size[1]} vs {pair.reference} "
                                 f"{reference_size[0]}x{reference_size[1]}")
            elif min(generated_size) < min_side:
                small.append(f"{path} {generated_size[0]}x{generated_size[1]}")
    problems = []
    if differing:
        problems.append(f"{what} compare images of one size (after the protocol's resizing; a paper --protocol "
                        f"resizes both sides), and {len(differing)} pairs differ: {images.listing(differing)}")
    if small:
        problems.append(f"the protocol's SSIM windows need images of at least {min_side} pixels a side; "
                        f"{len(small)} are smaller: {images.listing(small)}")
    if problems:
        raise UserError("; ".join(problems))


def _check_cache_dir(stats_cache_dir: Optional[str], data_dirs: Sequence[Optional[str]]) -> None:
    if stats_cache_dir is None:
        return
    cache = os.path.realpath(stats_cache_dir)
    for folder in filter(None, data_dirs):
        data = os.path.realpath(folder)
        if os.path.commonpath([cache, data]) == data:
            raise UserError(f"the FID statistics cache {stats_cache_dir} lies inside the image folder {folder}; "
                            "choose a cache folder outside the data (e.g. in the workdir)")


def _check_real_dir(protocol: protocols.Protocol, metrics: Sequence[str], real_dir: Optional[str]) -> None:
    if real_dir is not None and "fid" not in metrics:
        raise UserError("--real_dir holds FID's real images, and fid is not among the metrics")
    if "fid" not in metrics:
        return
    if protocol.fid_real_set == "train" and real_dir is None:
        raise UserError(f"protocol {protocol.name} computes FID against all training images: pass their folder "
                        "as --real_dir")
    if protocol.fid_real_set == "test_targets" and real_dir is not None:
        raise UserError(f"protocol {protocol.name} computes FID against the matched reference images; it takes "
                        "no --real_dir")


# --- metrics -------------------------------------------------------------------------------------------------


def select_oracle(pairs: Sequence[Pair], setting: protocols.SSIMSetting,
                  batch_size: int = BATCH_SIZE) -> Tuple[List[Pair], List[int]]:
    """Best-of-N selection (PCDMs): per pair the candidate with the highest SSIM (`setting`) against the
    reference resized to the candidate's size with PIL bicubic. Returns the pairs with one candidate left
    and the chosen candidate index per pair."""
    def load(pair):
        candidates = [images.read_rgb(path) for path in pair.generated]
        if len({c.shape for c in candidates}) > 1:
            listed = ", ".join(f"{p} {c.shape[0]}x{c.shape[1]}" for p, c in zip(pair.generated, candidates))
            raise UserError(f"the candidates of {pair.name} differ in size: {listed}")
        size = candidates[0].shape[:2]
        reference = Preparation("pil_bicubic", tuple(size), "round").apply(images.read_rgb(pair.reference))
        return np.stack(candidates).astype(np.float32), reference

    chosen = []
    for batch, loaded in _batches(list(pairs), load, batch_size):
        candidates = np.stack([c for c, _ in loaded])      # [B, N, h, w, 3]
        references = np.stack([r for _, r in loaded])     # [B, h, w, 3]
        count = candidates.shape[1]
        scores = setting.score(candidates.reshape((-1,) + candidates.shape[2:]),
                               np.repeat(references, count, axis=0))
        chosen.extend(int(k) for k in np.argmax(scores.reshape(len(batch), count), axis=1))
    selected = [Pair(pair.name, (pair.generated[k],), pair.reference) for pair, k in zip(pairs, chosen)]
    return selected, chosen


def _pixel_metrics(pairs: Sequence[Pair], protocol: protocols.Protocol, metrics: Sequence[str],
                   batch_size: int) -> Dict[str, float]:
    """Mean SSIM (every variant of the protocol) and PSNR over the pairs."""
    from pgpis_jax.metrics import ssim as ssim_lib

    def load(pair):
        return (_prepared(pair.generated[0], protocol.pixel_generated),
                _prepared(pair.reference, protocol.pixel_reference))

    values: Dict[str, list] = {}
    for _, loaded in _batches(list(pairs), load, batch_size):
        generated = np.stack([g for g, _ in loaded])
        reference = np.stack([r for _, r in loaded])
        if "ssim" in metrics:
            for setting in protocol.ssim:
                values.setdefault(setting.name, []).append(setting.score(generated, reference))
        if "psnr" in metrics:
            scale = protocol.psnr.value_scale / 255.0
            values.setdefault("psnr", []).append(
                ssim_lib.psnr(generated * scale, reference * scale, data_range=protocol.psnr.data_range))
    return {name: float(np.mean(np.concatenate(parts))) for name, parts in values.items()}


def _lpips(pairs: Sequence[Pair], protocol: protocols.Protocol, distance: DistanceFn, batch_size: int) -> float:
    """Mean LPIPS over the pairs."""
    def to_input(x):
        x = x / 255.0
        return 2.0 * x - 1.0 if protocol.lpips_input == "minus_one_one" else x

    def load(pair):
        return (_prepared(pair.generated[0], protocol.network_generated),
                _prepared(pair.reference, protocol.network_reference))

    parts = [distance(to_input(np.stack([g for g, _ in loaded])), to_input(np.stack([r for _, r in loaded])))
             for _, loaded in _batches(list(pairs), load, batch_size)]
    return float(np.mean(np.concatenate(parts)))


def _features(paths: Sequence[str], preparation: Preparation, feature_fn: FeatureFn, batch_size: int) -> np.ndarray:
    parts = [feature_fn(np.stack(loaded) / 255.0)
             for _, loaded in _batches(list(paths), lambda p: _prepared(p, preparation), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def _stat_hash(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        status = os.stat(path)
        digest.update(f"{status.st_size} {status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _fid_real_set(pairs: Sequence[Pair], protocol: protocols.Protocol, real_dir: Optional[str],
                  reference_dir: str) -> Tuple[List[str], str]:
    """(real image paths, their folder) that FID uses under the protocol; UserError for unreadable or too
    few images."""
    if protocol.fid_real_set == "test_targets":
        root, real = reference_dir, sorted({pair.reference for pair in pairs})
    else:
        root = real_dir if real_dir is not None else reference_dir
        real = images.list_images(root, recursive=real_dir is not None)
        images.image_sizes(real)
    real = real[:_whole_batches(real, protocol.fid_whole_batches_of, "FID real images", protocol.name)]
    if len(real) < 2:
        raise UserError(f"FID needs at least 2 real images; {root} gives {len(real)}")
    return real, root


def _real_statistics(paths: Sequence[str], root: str, protocol: protocols.Protocol, network_id: str,
                     feature_fn: FeatureFn, stats_cache_dir: Optional[str], batch_size: int):
    """(mu, sigma) of the real images, from the cache when it holds them for exactly these settings and files."""
    from pgpis_jax.metrics import fid

    preparation = protocol.network_reference
    meta = {"variant": network_id, "input_transform": protocol.fid_input_transform,
            "image_size": list(preparation.size) if preparation.size else "native",
            "resize_kernel": preparation.kernel, "quantize": preparation.quantize, "protocol": protocol.name,
            "whole_batches_of": protocol.fid_whole_batches_of, "num_images": len(paths),
            "real_dir": os.path.abspath(root),
            "file_list_hash": fid.file_list_hash(os.path.relpath(p, root) for p in paths),
            "file_stat_hash": _stat_hash(paths)}
    path = None
    if stats_cache_dir is not None:
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(stats_cache_dir, f"fid_real_{protocol.name}_{key}.npz")
        if os.path.isfile(path):
            logging.info("FID real statistics from %s", path)
            return fid.load_statistics(path, meta)
    mu, sigma = fid.statistics(_features(paths, preparation, feature_fn, batch_size))
    if path is not None:
        fid.save_statistics(path, mu, sigma, meta)
        logging.info("FID real statistics cached in %s", path)
    return mu, sigma


# --- the entry points ----------------------------------------------------------------------------------------


def score_folders(generated_dir: str, reference_dir: str, metrics=DEFAULT_METRICS, protocol="standard",
                  real_dir: Optional[str] = None, weights_dir: Optional[str] = None,
                  stats_cache_dir: Optional[str] = None, *, eval_size: Optional[Tuple[int, int]] = None,
                  match: Optional[str] = None, fid_features: Optional[FeatureFn] = None,
                  lpips_distance: Optional[DistanceFn] = None, batch_size: int = BATCH_SIZE) -> dict:
    """Scores the images in `generated_dir` against their references in `reference_dir`.

    metrics: "fid,lpips,ssim,psnr" or a subset (string or sequence). protocol: a preset name of
    pgpis_jax.metrics.protocols (or a Protocol); eval_size (height, width) overrides its size; match
    ("name" | "target_after_to") its pairing rule. real_dir: FID real images (searched recursively).
    weights_dir: folder of the networks' weight files. stats_cache_dir: where real-set FID statistics are
    cached (None: not cached). fid_features / lpips_distance: networks to use instead of loading the
    protocol's (features_fn(images [N, H, W, 3] in [0, 1]) -> [N, D]; distance_fn(x, y) -> [N], inputs
    mapped as the protocol says).

    generated_dir may hold sub-folders sample_0 ... sample_{N-1} with N candidates per pair for a protocol
    with best-of-N selection. Returns {"protocol", "settings", "generated_dir", "reference_dir", "real_dir",
    "metrics": {name: value}, "counts": {...}} plus "oracle" when candidates were selected. Problems with
    the inputs (files, sizes, flags) are UserErrors raised before any metric is computed.
    """
    metrics = parse_metrics(metrics)
    if isinstance(protocol, str):
        protocol = protocols.get_protocol(protocol, eval_size)
    elif eval_size is not None:
        raise ValueError("eval_size applies to a protocol given by name")
    _check_real_dir(protocol, metrics, real_dir)
    _check_cache_dir(stats_cache_dir, [generated_dir, reference_dir, real_dir])
    folders = images.candidate_folders(generated_dir)
    if len(folders) > 1 and protocol.oracle_candidates == 1:
        raise UserError(f"{generated_dir} holds {len(folders)} candidates per pair (sample_* folders), and protocol "
                        f"{protocol.name} scores one sample per pair: point --generated_dir at one of them")
    pairs, sizes = images.match_pairs(folders, reference_dir, match or protocol.match)
    if "ssim" in metrics or "psnr" in metrics:
        windows = [s.win_size or 2 * int(3.5 * s.sigma + 0.5) + 1 for s in protocol.ssim]
        _check_sizes(pairs, sizes, protocol.pixel_generated, protocol.pixel_reference, "SSIM and PSNR",
                     max(windows) if "ssim" in metrics else 1)
    names = [pair.name for pair in pairs]
    if "lpips" in metrics:
        lpips_count = _whole_batches(names, protocol.lpips_whole_batches_of, "LPIPS pairs", protocol.name)
        _check_sizes(pairs[:lpips_count], sizes, protocol.network_generated, protocol.network_reference, "LPIPS")
    if "fid" in metrics:
        real, real_root = _fid_real_set(pairs, protocol, real_dir, reference_dir)
        fid_count = _whole_batches(names, protocol.fid_whole_batches_of, "FID generated images", protocol.name)
        if fid_count < 2:
            raise UserError(f"FID needs at least 2 generated images; there are {fid_count}")

    results = {"protocol": protocol.name, "settings": protocol.describe(), "generated_dir": generated_dir,
               "reference_dir": reference_dir, "real_dir": real_dir, "metrics": {},
               "counts": {"pairs": len(pairs)}}
    if len(folders) > 1:
        pairs, chosen = select_oracle(pairs, protocol.oracle_ssim, batch_size)
        results["oracle"] = {"candidates": len(folders), "rule": f"best {protocol.oracle_ssim.name} against the "
                             "reference", "chosen_per_candidate": np.bincount(chosen, minlength=len(folders)).tolist()}
    if "ssim" in metrics or "psnr" in metrics:
        results["metrics"].update(_pixel_metrics(pairs, protocol, metrics, batch_size))
        results["counts"]["pixel_pairs"] = len(pairs)
    if "lpips" in metrics:
        if lpips_distance is None:
            from pgpis_jax.metrics.lpips import load_lpips

            lpips_distance = load_lpips(protocol.lpips_net, weights_dir)
        results["metrics"]["lpips"] = _lpips(pairs[:lpips_count], protocol, lpips_distance, batch_size)
        results["counts"]["lpips_pairs"] = lpips_count
    if "fid" in metrics:
        from pgpis_jax.metrics import fid

        network_id = protocol.fid_network
        if fid_features is None:
            from pgpis_jax.metrics.inception import load_inception

            fid_features = load_inception(protocol.fid_network, weights_dir, protocol.fid_input_transform)
        else:
            network_id = f"custom:{getattr(fid_features, '__qualname__', type(fid_features).__name__)}"
        generated = [pair.generated[0] for pair in pairs[:fid_count]]
        mu_real, sigma_real = _real_statistics(real, real_root, protocol, network_id, fid_features, stats_cache_dir,
                                               batch_size)
        mu, sigma = fid.statistics(_features(generated, protocol.network_generated, fid_features, batch_size))
        results["metrics"]["fid"] = fid.frechet_distance(mu, sigma, mu_real, sigma_real)
        results["counts"].update(fid_generated=len(generated), fid_real=len(real))
    order = sorted(results["metrics"], key=lambda name: METRICS.index(name.split("_")[0]))
    results["metrics"] = {name: results["metrics"][name] for name in order}
    return results


def format_table(results: dict) -> str:
    """A plain-text table of `results` (from score_folders): one line per metric with the images it used."""
    counts = results["counts"]
    over = {"fid": f"{counts.get('fid_generated')} generated vs {counts.get('fid_real')} real images",
            "lpips": f"{counts.get('lpips_pairs')} pairs"}
    lines = [f"protocol: {results['protocol']}"]
    if "oracle" in results:
        oracle = results["oracle"]
        lines[0] += f" (oracle: best of {oracle['candidates']} candidates by SSIM against the reference)"
    width = max([len(name) for name in results["metrics"]] + [6])
    lines.append(f"{'metric':<{width}}  {'value':>10}  over")
    for name, value in results["metrics"].items():
        where = over.get(name, f"{counts.get('pixel_pairs')} pairs")
        lines.append(f"{name:<{width}}  {value:>10.4f}  {where}")
    return "\n".join(lines)


def write_results(results: dict, path: str) -> None:
    """results as indented JSON at `path` (folders created), written under a temporary name and renamed."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def evaluate_method_outputs(config, output_dir: str, generated_dir: str, reference_dir: str) -> dict:
    """What a method's eval (eval.py --workdir --output_dir) calls once its test-set images are written: scores
    them with the settings of `config.eval` (fields of default_eval_config(); absent fields take those
    defaults), caches real-set FID statistics in <output_dir>/fid_stats, writes <output_dir>/metrics.json,
    prints the table and returns the results."""
    settings = default_eval_config()
    given = config.get("eval") or {}
    unknown = sorted(set(given.keys()) - set(settings.keys()))
    if unknown:
        raise UserError(f"unknown config.eval fields {', '.join(unknown)}; known: {', '.join(sorted(settings))}")
    settings.update(dict(given))
    results = score_folders(generated_dir, reference_dir, settings.metrics, settings.protocol,
                            real_dir=settings.real_dir or None, weights_dir=settings.weights_dir or None,
                            stats_cache_dir=os.path.join(output_dir, STATS_CACHE_SUBDIR),
                            eval_size=protocols.parse_size(settings.eval_size) if settings.eval_size else None)
    path = os.path.join(output_dir, RESULTS_FILE)
    write_results(results, path)
    print(format_table(results), flush=True)
    print(f"metrics -> {path}", flush=True)
    return results
