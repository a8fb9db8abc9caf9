"""Offline features of a stage's frozen networks (image encoders, the VAE): run them once over a split, then train
the stage on the stored features so that its training step runs only the trainable networks. Any stage built on
pgpis_jax.methods.common.stage.Stage has them (its FROZEN, INPUTS, DROPPABLE and `extract`).

    python extract_features.py --config=configs/pcdm_inpaint.py --workdir=/data/features/pcdm_inpaint
    python train.py --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint \\
        --config.data.features_dir=/data/features/pcdm_inpaint

What a stage stores is its `extract(params, batch)` (per example: VAE posterior moments, so that training still
draws a posterior sample per step; CLIP embeddings; DINOv2 tokens; pose inputs as uint8); condition dropout
swaps in the features of zeroed inputs (`constants.npz`), which equals zeroing the pixels before the encoder as
the original does. Features are fixed per example, so a stage whose layout augments in training (CFLD, FPDM,
RePoseDM flip or jitter) trains on the un-augmented features; PCDMs has no augmentation, so nothing changes.

A feature directory:
    features.json                    method, split, the settings the features depend on, the frozen
                                     parameters' fingerprint, shape and dtype per key, rows per shard
    constants.npz                    features of zeroed inputs, one row per key
    shard-<p>-of-<n>/<key>.bin       process p's rows, raw little-endian arrays [rows, *shape]
    shard-<p>-of-<n>/<key>.crc32     the CRC-32 of each row's bytes, little-endian uint32 [rows]; every row is
                                     checked against it when training reads it
    shard-<p>-of-<n>/progress.json   rows written so far (extraction resumes from there)

Training checks that the directory was made with the same settings and frozen weights (a fingerprint of every
frozen tensor) as the run, and refuses otherwise. The frozen networks stay in the parameter tree (stored once per
run in <workdir>/frozen_params), so a run trained on features samples on its own.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.hosts import summed_over_processes, with_batch_size

INDEX = "features.json"
CONSTANTS = "constants.npz"
# 2: a CRC-32 per row and key.
FORMAT_VERSION = 2
STORAGE_DTYPES = ("float32", "float16")
# Relative tolerance of the frozen-parameter fingerprint (float32 sums whose order depends on sharding).
FINGERPRINT_RTOL = 1e-4


def settings(config, frozen_networks) -> Dict[str, Any]:
    """What the features depend on: the method, the data and its preprocessing (not where it lives: no data_dir
    or coarse_dir), the frozen networks' specs and the compute dtype."""
    data = config.data
    pipeline = {k: v for k, v in dict(data.get("pipeline", {})).items() if k != "coarse_dir"}
    return json.loads(json.dumps({
        "method": config.method,
        "data": {"layout": data.layout, "dataset": data.dataset, "builder_config": data.get("builder_config", ""),
                 "image_size": list(data.image_size), "pipeline": pipeline},
        "frozen_networks": {name: _plain(config.model[name]) for name in frozen_networks},
        "compute_dtype": config.precision.compute_dtype}))


def fingerprint(params) -> Dict[str, List[float]]:
    """{parameter path: [sum, sum of squares]} of a parameter tree (float32 sums, computed where it lives)."""
    from pgpis_jax.trainer import tree

    sums = jax.jit(lambda p: jax.tree.map(
        lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))]), p))(params)
    return {tree.path_str(path): [float(v) for v in np.asarray(value)] for path, value in tree.flatten(sums).items()}


def fingerprint_mismatches(expected: Dict[str, List[float]], actual: Dict[str, List[float]]) -> List[str]:
    """Paths whose fingerprints differ (or exist on one side only)."""
    problems = sorted(set(expected) ^ set(actual))
    for path in sorted(set(expected) & set(actual)):
        if not np.allclose(expected[path], actual[path], rtol=FINGERPRINT_RTOL, atol=1e-6):
            problems.append(path)
    return problems


def _plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _shard_name(process_index: int, process_count: int) -> str:
    return f"shard-{process_index}-of-{process_count}"


# ---------------------------------------------------------------------------------------------- checksums


def checksum_path(path: str) -> str:
    """The row checksums of <key>.bin: <key>.crc32."""
    return os.path.splitext(path)[0] + ".crc32"


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (as stored), little-endian uint32 [len(rows)]."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
    return np.asarray([zlib.crc32(row) for row in flat], np.dtype("<u4"))


# ---------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends rows of features to this process's shard; resumes after the rows recorded in progress.json."""

    def __init__(self, directory: str, process_index: int, process_count: int, storage_dtype: str,
                 meta: Dict[str, Any]):
        if storage_dtype not in STORAGE_DTYPES:
            raise UserError(f"--dtype={storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        self.directory = os.path.join(directory, _shard_name(process_index, process_count))
        self.storage_dtype = storage_dtype
        os.makedirs(self.directory, exist_ok=True)
        self.progress_path = os.path.join(self.directory, "progress.json")
        self.rows, self.keys, self.meta = 0, None, meta
        if os.path.exists(self.progress_path):
            with open(self.progress_path) as f:
                progress = json.load(f)
            if progress["meta"] != meta:
                raise UserError(f"{self.directory} holds rows extracted with other settings or weights; use another "
                                f"--workdir or delete it")
            self.rows, self.keys = progress["rows"], progress["keys"]
            for key, spec in self.keys.items():
                self._truncate(key, spec)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.bin")

    def _truncate(self, key: str, spec) -> None:
        """Drops bytes past the recorded rows (a batch interrupted while being written)."""
        row = int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize
        for path, size in ((self._path(key), self.rows * row), (checksum_path(self._path(key)), self.rows * 4)):
            if not os.path.exists(path) or os.path.getsize(path) < size:
                raise UserError(f"{path} holds fewer rows than {self.progress_path} records; delete "
                                f"{self.directory} and extract again")
            with open(path, "r+b") as f:
                f.truncate(size)

    def stored(self, value: np.ndarray) -> np.ndarray:
        """value as stored: uint8 stays uint8, floats become the storage dtype, little-endian."""
        dtype = np.dtype(np.uint8) if value.dtype == np.uint8 else np.dtype(self.storage_dtype)
        return np.ascontiguousarray(value, dtype=dtype.newbyteorder("<"))

    def append(self, rows: Dict[str, np.ndarray]) -> None:
        stored = {k: self.stored(np.asarray(v)) for k, v in rows.items()}
        keys = {k: {"shape": list(v.shape[1:]), "dtype": v.dtype.str} for k, v in stored.items()}
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise UserError(f"{self.directory}: these features ({keys}) differ from those already written "
                            f"({self.keys}); delete it and extract again")
        counts = {len(v) for v in stored.values()}
        if len(counts) != 1:
            raise ValueError(f"feature rows differ in count: { {k: len(v) for k, v in stored.items()} }")
        for key, value in stored.items():
            with open(self._path(key), "ab") as f:
                f.write(value.tobytes())
            with open(checksum_path(self._path(key)), "ab") as f:
                f.write(row_checksums(value).tobytes())
        self.rows += counts.pop()
        with open(self.progress_path + ".tmp", "w") as f:
            json.dump({"rows": self.rows, "keys": self.keys, "meta": self.meta}, f)
        os.replace(self.progress_path + ".tmp", self.progress_path)


def extract_split(build, config, directory: str, split: str = "train", batch_size: Optional[int] = None,
                  storage_dtype: str = "float32") -> Dict[str, Any]:
    """Runs the stage's frozen networks over every pair of `split` (sharded over processes, resumable) into
    `directory`, with the parameters a fresh training run of `config` starts from (same seed, same warm start).
    `build(config)` makes the stage. Returns the index (features.json)."""
    from pgpis_jax import input_pipeline, trainer
    from pgpis_jax.trainer import mesh as mesh_lib

    config = with_batch_size(config, batch_size or config.batch_size)
    config.data.features_dir = ""   # extraction reads pixels
    stage = build(config)
    mesh_lib.maybe_initialize_distributed(config)
    # this process's devices only: the parameters are the same on every process (the run's seed), and the batches
    # are host-local. Only the frozen networks are initialised; zeros stand in for the others, which are not read.
    setup = trainer.setup(stage, config, mesh_lib.make_mesh(config, jax.local_devices()))
    unread = {name: jax.tree.map(lambda spec: np.zeros(spec.shape, spec.dtype), tree)
              for name, tree in setup.abstract_params.items() if name not in stage.FROZEN}
    params = trainer.initial_params(setup, stage, config, provided=unread)
    meta = {"method": config.method, "split": split, "storage_dtype": storage_dtype,
            "settings": settings(config, stage.FROZEN), "fingerprint": fingerprint(stage.frozen_params(params))}
    index_path = os.path.join(directory, INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if {k: index.get(k) for k in meta} != meta:
            raise UserError(f"{index_path} holds features extracted with other settings or weights; use another "
                            f"--workdir or delete it")
        print(f"{directory}: already extracted ({index['rows']} rows)", flush=True)
        return index
    p, n = jax.process_index(), jax.process_count()
    writer = ShardWriter(directory, p, n, storage_dtype, meta)
    extract = jax.jit(stage.extract)
    done, zeros = 0, None
    for batch in input_pipeline.from_config(config, split=split, train=False, process_index=p, process_count=n):
        inputs = {k: batch[k] for k in stage.INPUTS}
        if zeros is None:
            zeros = {k: np.zeros_like(v[:1]) for k, v in inputs.items()}
        real = np.asarray(batch["mask"])
        done += int(real.sum())
        if done <= writer.rows:
            continue
        features = jax.device_get(extract(params, inputs))
        writer.append({k: np.asarray(v)[real] for k, v in features.items()})
    if zeros is None:
        raise UserError(f"split {split!r} of {input_pipeline.dataset_name(config.data)} has no pairs")
    shard_rows = summed_over_processes(np.eye(n)[p] * writer.rows).astype(int).tolist()
    dropped = {name for names in stage.DROPPABLE.values() for name in names}
    constants = {k: np.asarray(v) for k, v in jax.device_get(extract(params, zeros)).items() if k in dropped}
    index = dict(meta, format_version=FORMAT_VERSION, keys=writer.keys, rows=int(sum(shard_rows)),
                 shards=[{"name": _shard_name(q, n), "rows": int(r)} for q, r in enumerate(shard_rows)])
    if p == 0:   # each under a temporary name, then renamed: features.json last, when everything is there
        with open(os.path.join(directory, CONSTANTS + ".tmp"), "wb") as f:
            np.savez(f, **constants)
        os.replace(os.path.join(directory, CONSTANTS + ".tmp"), os.path.join(directory, CONSTANTS))
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f, indent=2)
        os.replace(index_path + ".tmp", index_path)
    print(f"{directory}: {index['rows']} rows of {', '.join(sorted(writer.keys))}", flush=True)
    return index


# ---------------------------------------------------------------------------------------------- reading


class FeatureDataset:
    """The rows of a feature directory as read-only memory maps; `rows(indices)` gathers a batch."""

    def __init__(self, directory: str):
        path = os.path.join(directory, INDEX)
        if not os.path.isfile(path):
            raise UserError(f"config.data.features_dir={directory}: no {INDEX} there (extraction not run or not "
                            f"finished: python extract_features.py --config=... --workdir={directory})")
        with open(path) as f:
            self.index = json.load(f)
        if self.index.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format_version {self.index.get('format_version')}, expected {FORMAT_VERSION} "
                            f"(version 2 adds row checksums): extract the features again")
        self.directory = directory
        self.keys = self.index["keys"]
        with np.load(os.path.join(directory, CONSTANTS)) as constants:
            self.constants = {k: constants[k] for k in constants.files}
        self._maps, self._checksums, self._files = [], [], []
        for shard in self.index["shards"]:
            maps, sums, files = {}, {}, {}
            for key, spec in self.keys.items():
                file = os.path.join(directory, shard["name"], f"{key}.bin")
                shape = (shard["rows"], *spec["shape"])
                expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize
                for path, size in ((file, expected), (checksum_path(file), 4 * shard["rows"])):
                    if not os.path.isfile(path) or os.path.getsize(path) != size:
                        raise UserError(f"{path}: expected {size} bytes ({shape} {spec['dtype']}); the feature "
                                        f"directory is incomplete or was changed")
                maps[key] = np.memmap(file, dtype=np.dtype(spec["dtype"]), mode="r", shape=shape)
                sums[key] = np.memmap(checksum_path(file), dtype=np.dtype("<u4"), mode="r", shape=(shard["rows"],))
                files[key] = file
            self._maps.append(maps)
            self._checksums.append(sums)
            self._files.append(files)
        self._starts = np.cumsum([0] + [s["rows"] for s in self.index["shards"]])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def check(self, expected_settings: Dict[str, Any], split: str = "train") -> None:
        """UserError naming what differs between this directory's settings and the run's."""
        recorded = self.index["settings"]
        differ = [k for k in sorted(set(recorded) | set(expected_settings))
                  if recorded.get(k) != expected_settings.get(k)]
        if self.index["split"] != split:
            differ.append(f"split ({self.index['split']!r}, not {split!r})")
        if differ:
            details = "; ".join(f"{k}: features {recorded.get(k)!r}, run {expected_settings.get(k)!r}"
                                for k in differ if k in recorded or k in expected_settings)
            raise UserError(f"config.data.features_dir={self.directory} was extracted with other settings "
                            f"({', '.join(differ)}): {details}")

    def rows(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """{key: [len(indices), *shape]} in the order of `indices` (global row numbers), each row checked against
        the checksum written with it (UserError naming the file and row if it differs)."""
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        out = {k: np.empty((len(indices), *spec["shape"]), np.dtype(spec["dtype"]).newbyteorder("="))
               for k, spec in self.keys.items()}
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = indices[where] - self._starts[s]
            order = np.argsort(local)   # sorted reads are kinder to memory maps
            for key, array in self._maps[s].items():
                rows = array[local[order]]
                bad = np.nonzero(row_checksums(rows) != self._checksums[s][key][local[order]])[0]
                if bad.size:
                    raise UserError(f"{self._files[s][key]}: row {int(local[order][bad[0]])} does not match the "
                                    f"checksum written with it ({checksum_path(self._files[s][key])}): the file was "
                                    "changed or damaged after extraction; extract the features again")
                out[key][where[order]] = rows
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in out.items()}


class FeatureIterator:
    """This process's training batches from a FeatureDataset: each epoch a fresh permutation of all rows
    (seeded by config.seed and the epoch), cut into global batches (the remainder dropped), each process taking
    its consecutive slice. Batches carry `example_id` (position in the epoch's stream) and `mask`."""

    def __init__(self, dataset: FeatureDataset, global_batch: int, process_index: int, process_count: int,
                 seed: int):
        if len(dataset) < global_batch:
            raise UserError(f"{dataset.directory} holds {len(dataset)} rows, fewer than config.batch_size="
                            f"{global_batch}")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.batches_per_epoch = len(dataset) // global_batch
        self.position = 0   # batches returned so far
        self._order_epoch, self._order = -1, None

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        epoch, step = divmod(self.position, self.batches_per_epoch)
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        start = step * self.global_batch + self.offset
        batch = self.dataset.rows(self._order[start:start + self.local_batch])
        batch["example_id"] = np.arange(start, start + self.local_batch, dtype=np.int32)
        batch["mask"] = np.ones(self.local_batch, bool)
        self.position += 1
        return batch

    def get_state(self) -> Any:
        return {"position": self.position}

    def set_state(self, state: Any) -> None:
        self.position = int(state["position"])


def open_for_training(config, frozen_networks) -> Optional[FeatureDataset]:
    """The run's FeatureDataset when config.data.features_dir is set (checked against the run's settings),
    else None."""
    directory = config.data.get("features_dir") or ""
    if not directory:
        return None
    dataset = FeatureDataset(directory)
    dataset.check(settings(config, frozen_networks))
    return dataset
