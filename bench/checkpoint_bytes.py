"""Bytes per checkpoint step of the full-size PCDMs stages, from `jax.eval_shape` alone (no weights, no data).

The stages are built as the parameter report builds them (python -m pgpis_jax.inspect): the published network
configs of SD 2.1-base (UNet, VAE), OpenCLIP ViT-H/14 (IP-Adapter's image encoder) and DINOv2-giant
(pgpis_jax/weights/published.py), then the trainer's setup gives the abstract state. Printed: the
bytes each checkpoint step holds now (trainable parameters, EMA, optimizer state) and once per run (frozen
parameters), and what a step held when every step carried the whole state (all parameters + EMA + optimizer).

    .venv/bin/python bench/checkpoint_bytes.py [--ema]
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pgpis_jax import methods  # noqa: E402
from pgpis_jax.methods.common.networks import DeclaredNetworks  # noqa: E402
from pgpis_jax.trainer import checkpoints, loop  # noqa: E402
from pgpis_jax.trainer import mesh as mesh_lib  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ema", action="store_true", help="with an EMA of the trainable parameters")
    args = parser.parse_args()
    mesh = None
    print("| stage | trainable params | frozen params | per step now (params + EMA + optimizer) | frozen, once per "
          "run | per step before (whole state) |")
    print("|---|---|---|---|---|---|")
    for stage in ("prior", "inpaint", "refine"):
        config = importlib.import_module(f"configs.pcdm_{stage}").get_config()
        if args.ema:
            config.ema.decay = 0.9999
        method = methods.get_method(config.method).build(config, saved_networks=DeclaredNetworks(config))
        mesh = mesh or mesh_lib.make_mesh(config)
        s = loop.setup(method, config, mesh)
        items, frozen = checkpoints.checkpoint_bytes(s)
        trainable = sum(leaf.size for leaf in jax.tree.leaves(s.opt.split(s.abstract_params)[0]))
        total = sum(leaf.size for leaf in jax.tree.leaves(s.abstract_params))
        step = sum(items.values())
        print(f"| {config.method} | {trainable:,} | {total - trainable:,} | {step / 2**30:.2f} GiB | "
              f"{frozen / 2**30:.2f} GiB | {(step + frozen) / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
