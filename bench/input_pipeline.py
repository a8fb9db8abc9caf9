"""Pairs per second of the training input pipeline (pgpis_jax/input_pipeline.py) on this machine.

DeepFashion-format data is made on the fly: synthetic people written in the DPTN / CFLD layout at 256x176
(JPEG q95, the annotation CSVs, pairs CSVs), built into `deepfashion/256x176` through the real builder, then
read back through the training pipeline of each requested method at its default (paper) shapes, as the trainer
reads it: encoded batches (uint8 levels, pose-map parts) that the train step decodes on the devices. The first
batch (graph construction, shuffle-buffer fill) is not timed. Besides pairs/s it prints the process's CPU time
(all threads) per pair, which other jobs on a shared machine disturb less than the wall-clock rate, and the time
of that device decode, jitted on this machine's CPU, per pair (on an accelerator it is a small part of a step).

    .venv/bin/python bench/input_pipeline.py                       # pairs, cfld, pcdm_inpaint, fpdm, reposedm
    .venv/bin/python bench/input_pipeline.py --methods=pairs --batch_size=32 --num_batches=50
    .venv/bin/python bench/input_pipeline.py --decoded             # batches decoded on the host (evaluation's)
"""

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from pgpis_jax import input_pipeline  # noqa: E402
from pgpis_jax.datasets import synthetic  # noqa: E402


def build_deepfashion(workdir, identities, poses_per_identity):
    manual = Path(workdir) / "fashion"
    synthetic.write_deepfashion_layout(manual, hw=(256, 176), num_train=identities, num_test=2,
                                       poses_per_identity=poses_per_identity)
    sys.path.insert(0, str(ROOT / "data"))
    module = importlib.import_module("deepfashion.deepfashion_dataset_builder")
    builder = module.Builder(config="256x176", data_dir=str(Path(workdir) / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def device_decode_ms(pipeline, batch, repeats=5):
    """Milliseconds per pair of the jitted device decode of `batch` on JAX's default device (best of `repeats`)."""
    import jax

    decode = jax.jit(pipeline.device_decode)
    jax.block_until_ready(decode(batch))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(decode(batch))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(batch["mask"])


def measure(builder, method, batch_size, num_batches, encoded):
    pipeline = input_pipeline.InputPipeline(builder, split="train", batch_size=batch_size, layout=method,
                                            seed=0, process_index=0, process_count=1, encoded=encoded)
    if num_batches + 1 > pipeline.steps_per_epoch:
        raise SystemExit(f"{num_batches + 1} batches exceed one epoch ({pipeline.steps_per_epoch}); "
                         "raise --identities")
    start = time.perf_counter()
    batch = next(pipeline)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(pipeline)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])} {v.dtype}" for k, v in batch.items() if k != "mask")
    pairs = num_batches * batch_size
    decode_ms = device_decode_ms(pipeline, batch) if encoded else 0.0
    return pairs / seconds, 1e3 * cpu_seconds / pairs, first, decode_ms, shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="pairs,cfld,pcdm_inpaint,fpdm,reposedm")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_batches", type=int, default=30)
    parser.add_argument("--identities", type=int, default=60, help="train identities (4 photos, 12 pairs each)")
    parser.add_argument("--decoded", action="store_true", help="decode on the host (the batches evaluation reads)")
    args = parser.parse_args()
    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        builder = build_deepfashion(workdir, args.identities, 4)
        print(f"made and built deepfashion/256x176 ({builder.info.splits['train'].num_examples} train pairs) in "
              f"{time.perf_counter() - start:.1f} s")
        for method in args.methods.split(","):
            rate, cpu_ms, first, decode_ms, shapes = measure(builder, method, args.batch_size, args.num_batches,
                                                             not args.decoded)
            decode = "" if args.decoded else f", device decode {decode_ms:5.2f} ms a pair"
            print(f"{method:>13}: {rate:7.1f} pairs/s, {cpu_ms:5.1f} CPU ms a pair{decode}  (batch {args.batch_size}, "
                  f"{args.num_batches} batches; first batch {first:.1f} s)  per pair: {shapes}")


if __name__ == "__main__":
    main()
