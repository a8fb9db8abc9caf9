"""Fréchet Inception Distance: feature statistics, the distance, and cached statistics files.

FID = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), computed on the host in float64
as pytorch-fid and the papers' scripts do (scipy's Schur-based sqrtm; when it is not finite, retried with
eps * I added to both covariances; a small imaginary part of the result is dropped, a large one is an error).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Mapping, Tuple

import numpy as np
import scipy.linalg

from pgpis_jax.errors import UserError

# Keys every statistics file's meta must have (others may be added, e.g. a preset name or a weights hash).
REQUIRED_META_KEYS = ("variant", "input_transform", "image_size", "resize_kernel", "num_images", "file_list_hash")
# Largest |imag| tolerated on the diagonal of sqrtm(sigma1 sigma2) (pytorch-fid's tolerance).
IMAGINARY_TOLERANCE = 1e-3


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Features [N, D] (N >= 2) -> (mean [D], unbiased covariance [D, D]), float64 (np.cov rowvar=False)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(dim)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > IMAGINARY_TOLERANCE:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary diagonal component of {largest:.3g} "
                             f"(> {IMAGINARY_TOLERANCE}); the covariances are not valid")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def file_list_hash(file_names: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted file names joined by newlines: identifies the image set of a statistics file."""
    return hashlib.sha256("\n".join(sorted(file_names)).encode("utf-8")).hexdigest()


def _normalised_meta(meta: Mapping) -> dict:
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"statistics meta lacks {', '.join(missing)}; required: {', '.join(REQUIRED_META_KEYS)}")
    return json.loads(json.dumps(dict(meta), sort_keys=True))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, meta: Mapping) -> None:
    """Writes mu [D], sigma [D, D] (float64) and `meta` (JSON-serialisable, with REQUIRED_META_KEYS) to the .npz
    file `path`."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    meta_json = json.dumps(_normalised_meta(meta), sort_keys=True)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, meta=np.asarray(meta_json))


def load_statistics(path: str, meta: Mapping) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a file written by save_statistics, whose meta must equal `meta` (after a JSON round
    trip): a missing file, a file without statistics or any differing key is a UserError naming the path and
    the keys, so a stale cache is never used."""
    expected = _normalised_meta(meta)
    if not os.path.isfile(path):
        raise UserError(f"FID statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma, stored = data["mu"], data["sigma"], json.loads(str(data["meta"]))
    except (KeyError, ValueError, OSError) as error:
        raise UserError(f"{path} is not an FID statistics file ({type(error).__name__}: {error})") from None
    differing = sorted(key for key in set(expected) | set(stored) if expected.get(key) != stored.get(key))
    if differing:
        details = "; ".join(f"{key}: stored {stored.get(key, '(absent)')!r}, wanted {expected.get(key, '(absent)')!r}"
                            for key in differing)
        raise UserError(f"FID statistics file {path} was computed for other settings ({details}); delete it or "
                        f"use another path")
    return mu, sigma
