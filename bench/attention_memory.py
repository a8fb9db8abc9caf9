"""Compiled memory of one attention call, per kernel: XLA's temp bytes (jax.jit(...).lower(...).compile()
.memory_analysis()) for the forward and for the forward + backward (gradients w.r.t. query, key and value).

Default shapes: PCDMs' stage-2 canvas at 512x352 (two images side by side, latent 64x88 = 5,632 tokens), self-
attention, 8 heads of 40, one example. Nothing is run, only compiled (for the local device, CPU by default).

    JAX_PLATFORMS=cpu .venv/bin/python bench/attention_memory.py [--tokens 5632 --heads 8 --head-dim 40]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pgpis_jax.nn.attention import dot_product_attention  # noqa: E402

MIB = 2**20


def temp_bytes(fn, *args) -> int:
    """XLA's temporary buffer bytes of fn compiled for these abstract arguments."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def implementations(dtype) -> tuple:
    """The kernels this device runs: xla and chunked everywhere, cuDNN flash on GPUs in 16-bit, splash on TPUs."""
    fused = {"gpu": ("cudnn",) if jnp.dtype(dtype).itemsize == 2 else (), "tpu": ("splash",)}
    return ("xla", "chunked") + fused.get(jax.default_backend(), ())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    x = jax.ShapeDtypeStruct((args.batch, args.tokens, args.heads, args.head_dim), jnp.dtype(args.dtype))
    logits = args.batch * args.heads * args.tokens**2 * 4
    print(f"device {jax.devices()[0].device_kind}; q = k = v {x.shape} {x.dtype}; one float32 logits tensor "
          f"[B, H, L, L] is {logits / MIB:.1f} MiB")
    print("| implementation | forward temp MiB | forward + backward temp MiB |")
    print("|---|---|---|")
    for implementation in implementations(x.dtype):
        attend = lambda q, k, v: dot_product_attention(q, k, v, implementation)  # noqa: E731
        loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()  # noqa: E731
        forward = temp_bytes(attend, x, x, x)
        backward = temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
        print(f"| {implementation} | {forward / MIB:.1f} | {backward / MIB:.1f} |")


if __name__ == "__main__":
    main()
