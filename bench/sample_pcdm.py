"""Images/s of the three-stage PCDMs sampler (prior -> inpaint -> refine, 20 DDIM steps each, classifier-free
guidance w = 2) for ours and a PyTorch pipeline of the same networks with the same weights, in one run on one
device.

    python bench/sample_pcdm.py                  # the demo's networks at its 64x64 shapes, fp32 (CPU; the default)
    python bench/sample_pcdm.py --preset=full    # SD 2.1-base UNets at 512x512, the 20-layer prior, bf16 (GPU)

Both sides run tests/pcdm_sampling_reference.py: the three denoising loops from conditions drawn once (what the
encoders would give; stage 3 starts from the right half of stage 2's canvas latent, no VAE decode or encode on
either side); PyTorch with diffusers' UNet and DDIMScheduler from the same scheduler configs, the prior of
tests/pcdm_torch_reference.py, under no_grad (bf16: autocast over fp32 weights, as ours computes in bf16 over
fp32 params). Ours is jitted; its compile time is printed apart and not in the images/s. Before timing, the final
output of each stage is compared between the two (relative error; ~1e-6 in fp32, the proof of equal work).

Prints both numbers and the ratio ours / PyTorch; append the line to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pcdm_sampling_reference import (build_stages, compare, our_params, random_conditions,  # noqa: E402
                                           sample_ours, sample_torch, torch_conditions, torch_networks)
from timing import median_seconds  # noqa: E402

PRESETS = {
    # configs/pcdm_*.py:demo: prior 2 layers of width 32; UNets of width 64 over 8x16 (stage 2) and 8x8 (stage 3)
    # latents of 30 channels, 17 tokens.
    "small": dict(arg="demo", batch=4, dtype="float32"),
    # configs/pcdm_*.py:res=512: prior 20 layers of width 2048; SD 2.1-base UNets over 64x128 and 64x64 latents,
    # 257 DINOv2-giant tokens of width 1024.
    "full": dict(arg="res=512", batch=4, dtype="bfloat16"),
}
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 2.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=3, help="timed three-stage runs per side (after two warm-ups)")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="PyTorch's intra-op CPU threads (0: its default, one per core); on a loaded CPU its "
                             "default threads wait on each other (the demo's UNet: 50 ms a call on 1 thread, 2-4 s "
                             "on 2, at load 10)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stages = build_stages(preset["arg"], compute_dtype=preset["dtype"])
    networks = {name: network.to(device) for name, network in torch_networks(stages).items()}
    params = jax.device_put(our_params(stages, networks))
    conditions = random_conditions(stages, preset["batch"])
    torch_inputs = torch_conditions(conditions, device)
    conditions = jax.device_put(conditions)
    autocast_dtype = torch.bfloat16 if preset["dtype"] == "bfloat16" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    start = time.perf_counter()
    ours = jax.jit(lambda p, c: sample_ours(stages, p, c, NUM_INFERENCE_STEPS, GUIDANCE_SCALE)).lower(
        params, conditions).compile()
    compile_seconds = time.perf_counter() - start

    def run_torch():
        result = sample_torch(stages, networks, torch_inputs, NUM_INFERENCE_STEPS, GUIDANCE_SCALE, autocast_dtype)
        sync()
        return result

    errors = compare(jax.block_until_ready(ours(params, conditions)), run_torch())
    torch_seconds = median_seconds(run_torch, args.steps)
    jax_seconds = median_seconds(lambda: jax.block_until_ready(ours(params, conditions)), args.steps)

    b = preset["batch"]
    shapes = {name: value.shape for name, value in conditions.items()}
    print(f"device: jax {jax.devices()[0].device_kind}, torch {device} ({torch.get_num_threads()} threads); "
          f"preset {args.preset} (configs/pcdm_*.py:{preset['arg']}), {preset['dtype']}: batch {b}, "
          f"{NUM_INFERENCE_STEPS} DDIM steps per stage, guidance {GUIDANCE_SCALE}; embedding {shapes['prior_noise'][1:]}, canvas latent "
          f"{shapes['canvas_noise'][1:]}, refine latent {shapes['refine_noise'][1:]}, "
          f"{shapes['inpaint_tokens'][1]} tokens")
    print("ours vs pytorch, relative error: " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    print(f"ours compile {compile_seconds:.1f} s (not timed below)")
    print(f"three stages  ours {b / jax_seconds:8.2f} img/s   pytorch {b / torch_seconds:8.2f} img/s   "
          f"ratio ours/pytorch {torch_seconds / jax_seconds:.2f}")


if __name__ == "__main__":
    main()
