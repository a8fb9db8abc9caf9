"""Images/s of one UNet training step (forward, backward, AdamW update) and of a forward pass alone, for our
Flax UNet and diffusers' PyTorch UNet with the same config and weights, in one run on one device.

    python bench/unet_train_step.py                      # small config on CPU (the default)
    python bench/unet_train_step.py --preset=pcdm_demo   # the PCDMs demo's stage-2 UNet at the demo's shapes
    python bench/unet_train_step.py --preset=pcdm        # SD 2.1-base at PCDMs stage-2 shapes, bf16 (GPU)

Attention runs with the configs' setting "auto" (pgpis_jax.nn.attention: chunked for long sequences on CPU,
cuDNN on GPU in bf16); PyTorch on a GPU with diffusers' default processor (scaled_dot_product_attention), on CPU
with its classic one (set_default_attn_processor), as the CPU results in bench/RESULTS.md were measured.

Prints both numbers and the ratio ours / PyTorch; append the line to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from diffusers import UNet2DConditionModel as TorchUNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.pcdm_common import DEMO_LATENT_CHANNELS, demo_unet  # noqa: E402
from pgpis_jax.models.unet import UNet2DConditionModel  # noqa: E402
from pgpis_jax.weights.pytorch import state_dict_to_params  # noqa: E402
from timing import median_seconds  # noqa: E402

_DEMO_STAGE2_UNET = {k: v for k, v in demo_unet(2 * DEMO_LATENT_CHANNELS + 1, class_embedding=True).config.items()
                     if k != "_class_name"}

PRESETS = {
    "small": dict(
        unet=dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                  use_linear_projection=True),
        batch=4, height=32, width=32, tokens=16, dtype="float32"),
    # The PCDMs demo's stage 2 (configs/pcdm_inpaint.py:demo): 8x16 canvas latents of 61 channels (two DCT codes
    # and the mask), 17 projected DINOv2 tokens + the global one, the global CLIP embedding as class labels.
    "pcdm_demo": dict(unet=_DEMO_STAGE2_UNET, batch=16, height=8, width=16, tokens=18, dtype="float32"),
    # SD 2.1-base UNet, PCDMs stage 2: latent 64x128, 9 input channels, 258 tokens of width 1024, batch 8.
    "pcdm": dict(
        unet=dict(sample_size=64, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  layers_per_block=2, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True),
        batch=8, height=64, width=128, tokens=258, dtype="bfloat16"),
}


def bench_torch(model, inputs, dtype, steps):
    device = next(model.parameters()).device
    sample, timestep, context, target, labels = (None if a is None else torch.from_numpy(a).to(device)
                                                 for a in inputs)
    sample, target = sample.permute(0, 3, 1, 2).contiguous(), target.permute(0, 3, 1, 2).contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        with autocast:
            prediction = model(sample, timestep, context, class_labels=labels).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    @torch.no_grad()
    def forward():
        with autocast:
            model(sample, timestep, context, class_labels=labels)
        sync()

    return median_seconds(train_step, steps), median_seconds(forward, steps)


def bench_jax(module, params, inputs, steps):
    sample, timestep, context, target, labels = (None if a is None else jnp.asarray(a) for a in inputs)
    optimizer = optax.adamw(1e-4)
    state = (params, optimizer.init(params))

    def loss_fn(p):
        prediction = module.apply({"params": p}, sample, timestep, context, class_labels=labels)
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))

    @functools.partial(jax.jit, donate_argnums=0)   # the state is donated, as trainer/step.py does
    def train_step(state):
        p, opt_state = state
        grads = jax.grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    forward = jax.jit(lambda p: module.apply({"params": p}, sample, timestep, context, class_labels=labels))
    holder = {"state": state}

    def run_train():
        holder["state"] = jax.block_until_ready(train_step(holder["state"]))

    train_seconds = median_seconds(run_train, steps)
    trained = holder["state"][0]   # the given params were donated to the first step
    return train_seconds, median_seconds(lambda: jax.block_until_ready(forward(trained)), steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):   # built where it runs (on a GPU, not initialised on the CPU first)
        torch_model = TorchUNet(**preset["unet"])
    if device == "cpu":   # the classic processor the CPU results were measured with; on a GPU diffusers' default
        torch_model.set_default_attn_processor()   # (SDPA: flash attention; the classic one runs out of memory)
    dtype = preset["dtype"]
    params = state_dict_to_params({k: v.float().cpu().numpy() for k, v in torch_model.state_dict().items()})
    module = UNet2DConditionModel.from_config(dict(preset["unet"]), dtype=jnp.dtype(dtype),
                                              attention_implementation="auto")
    rng = np.random.default_rng(0)
    b, h, w = preset["batch"], preset["height"], preset["width"]
    inputs = (rng.standard_normal((b, h, w, preset["unet"]["in_channels"])).astype(np.float32),
              rng.integers(0, 1000, (b,)).astype(np.int64),
              rng.standard_normal((b, preset["tokens"], preset["unet"]["cross_attention_dim"])).astype(np.float32),
              rng.standard_normal((b, h, w, preset["unet"]["out_channels"])).astype(np.float32),
              rng.standard_normal((b, preset["unet"].get("projection_class_embeddings_input_dim") or 0))
              .astype(np.float32) if preset["unet"].get("class_embed_type") else None)
    print(f"device: jax {jax.devices()[0].device_kind}, torch {device}; preset {args.preset}: batch {b}, "
          f"latent {h}x{w}x{preset['unet']['in_channels']}, {preset['tokens']} tokens, {dtype}", flush=True)
    torch_train, torch_forward = bench_torch(torch_model, inputs, dtype, args.steps)
    print(f"pytorch: train step {b / torch_train:.2f} img/s, forward {b / torch_forward:.2f} img/s "
          "(ours next, after its compiles)", flush=True)
    del torch_model
    if device == "cuda":
        torch.cuda.empty_cache()   # JAX allocates on demand (bench/accelerator.sh) from what PyTorch gives back
    jax_train, jax_forward = bench_jax(module, jax.device_put(params), inputs, args.steps)
    for label, ours, theirs in (("train step", jax_train, torch_train), ("forward", jax_forward, torch_forward)):
        print(f"{label:<11} ours {b / ours:8.2f} img/s   pytorch {b / theirs:8.2f} img/s   "
              f"ratio ours/pytorch {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
