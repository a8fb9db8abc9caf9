"""Compiled memory and FLOPs of full-size training steps, per remat policy x attention kernel x per-device batch.

    python bench/memory_plan.py                               # PCDMs stages 2 and 3, res 256 and 512, on this device
    python bench/memory_plan.py --stages=pcdm_inpaint --res=512 --batches=1,8 --remats=none --kernels=chunked
    python bench/memory_plan.py --fsdp=8 --batches=8     # per device of 8, the state sharded (config.mesh.fsdp=8)

Each cell builds the stage from its config (`configs/<stage>.py:res=<res>`, pixel inputs: the frozen VAE and image
encoders run inside the step, as `train.py` runs it without --config.data.features_dir), sets config.batch_size,
config.remat and config.model.attention_implementation, and compiles the real train step (trainer/step.py, state
donated) for abstract inputs: `jax.jit(step).lower(state, batch).compile()`. Nothing is executed and no weights
are read. Printed per cell, from `memory_analysis()` and `cost_analysis()` of that executable:

    arguments (the state and batch), temp (XLA's scratch: activations kept for the backward, workspaces),
    peak = arguments + outputs - aliased (donated) + temp, and the step's FLOPs.

With --fsdp=N the step is compiled for N devices (on CPU: N host devices, `jax_num_cpu_devices`) with
config.mesh.fsdp = N, the parameters and AdamW moments sharded by the configs' fsdp rules and the batch split
over the devices (global batch = N x the per-device batch); memory and FLOPs are then those of one device's
program.

The numbers are the compiler's of the device the script runs on (on CPU: XLA's CPU compiler and its buffer
assignment; an accelerator's compiler fuses and schedules differently). Prints one Markdown row per cell.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgpis_jax import methods  # noqa: E402
from pgpis_jax.methods.common.networks import DeclaredNetworks  # noqa: E402
from pgpis_jax.trainer import loop  # noqa: E402
from pgpis_jax.trainer import mesh as mesh_lib  # noqa: E402

GIB = 2**30
# XLA's HLO passes and buffer assignment (what memory_analysis reports) run in full; only the CPU backend's LLVM
# code generation, which dominates compile time for these graphs, is cut short. Checked on one cell
# (pcdm_refine, res 256, batch 1, no remat, chunked): the same GiB (to 0.01) and FLOPs as a default compile.
FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ENCODER_SIZE = 224   # CLIP / DINOv2 inputs of every PCDMs stage


def pixel_batch(stage: str, res: int, batch: int, sharding=None) -> dict:
    """Abstract training batch of a PCDMs stage in its pixel layout (pgpis_jax/input_pipeline.py: images squashed
    to res x res; the stage-2 canvas is [source | target], res x 2 res), each array with `sharding`."""
    array = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    image = lambda width: array((batch, res, width, 3))  # noqa: E731
    encoder_input = array((batch, ENCODER_SIZE, ENCODER_SIZE, 3))
    example_id = array((batch,), jnp.int32)
    if stage == "pcdm_inpaint":
        return {"image": image(2 * res), "pose": image(2 * res), "source_dino": encoder_input,
                "target_clip": encoder_input, "example_id": example_id}
    if stage == "pcdm_refine":
        return {"target_image": image(res), "coarse_image": image(res), "source_dino": encoder_input,
                "example_id": example_id}
    raise ValueError(f"--stages: {stage!r} is not one of pcdm_inpaint, pcdm_refine")


def compiled_memory(stage: str, res: int, batch: int, remat: str, kernel: str, compute_dtype: str,
                    fsdp: int = 1) -> dict:
    """Memory (bytes, per device) and FLOPs of the compiled train step of one cell; `batch` per device."""
    config = importlib.import_module(f"configs.{stage}").get_config(f"res={res}")
    config.precision.compute_dtype = compute_dtype
    config.batch_size = batch * fsdp
    config.mesh.data, config.mesh.fsdp = 1, fsdp
    config.remat = remat
    config.model.attention_implementation = kernel
    method = methods.get_method(config.method).build(config, saved_networks=DeclaredNetworks(config))
    mesh = mesh_lib.make_mesh(config, jax.devices()[:fsdp])   # per device also on a host with more
    s = loop.setup(method, config, mesh)
    batch_sharding = NamedSharding(mesh, P(tuple(config.mesh.batch_axes)))
    start = time.perf_counter()
    lowered = jax.jit(s.train_step, donate_argnums=0).lower(
        s.abstract_state, pixel_batch(stage, res, batch * fsdp, batch_sharding))
    compiled = lowered.compile(compiler_options=FAST_CODEGEN)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return {"arguments": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes, "peak": peak,
            "flops": float(cost.get("flops", float("nan"))), "compile_seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="pcdm_inpaint,pcdm_refine")
    parser.add_argument("--res", default="256,512")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--remats", default="none,dots_with_no_batch_dims_saveable,full")
    parser.add_argument("--kernels", default="xla,chunked")
    parser.add_argument("--compute_dtype", default="float32", help="config.precision.compute_dtype")
    parser.add_argument("--fsdp", type=int, default=1, help="devices the state is sharded over (config.mesh.fsdp)")
    args = parser.parse_args()
    if args.fsdp > 1:   # CPU host devices (before the first device query); accelerators count their own
        jax.config.update("jax_num_cpu_devices", args.fsdp)
    if len(jax.devices()) < args.fsdp:
        raise SystemExit(f"--fsdp={args.fsdp}: only {len(jax.devices())} {jax.default_backend()} device(s)")
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731
    print(f"device: {jax.devices()[0].device_kind} (jax {jax.__version__}); float32 parameters and AdamW moments, "
          f"{args.compute_dtype} compute; state sharded over {args.fsdp} device(s) (config.mesh.fsdp)")
    print("| stage | res | batch/device | remat | attention | arguments GiB | temp GiB | peak GiB | TFLOPs/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, res, batch, remat, kernel in itertools.product(split(args.stages), map(int, split(args.res)),
                                                             map(int, split(args.batches)), split(args.remats),
                                                             split(args.kernels)):
        cell = compiled_memory(stage, res, batch, remat, kernel, args.compute_dtype, args.fsdp)
        print(f"| {stage} | {res} | {batch} | {remat} | {kernel} | {cell['arguments'] / GIB:.2f} | "
              f"{cell['temp'] / GIB:.2f} | {cell['peak'] / GIB:.2f} | {cell['flops'] / 1e12:.2f} |", flush=True)
        print(f"  (compiled in {cell['compile_seconds']:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
