"""What a config trains, from the abstract state alone: parameters per top-level network (all and trainable), the
trainable and frozen totals, and the bytes of one checkpoint step in the configured dtypes. Printed by
`python -m pgpis_jax.inspect` and logged when training starts."""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from pgpis_jax.trainer import checkpoints as ckpt_lib
from pgpis_jax.trainer import tree

GIB = 2**30


def parameter_report(s: Any) -> Dict[str, Any]:
    """The report of a trainer.loop.Setup `s`:

    {"networks": {top-level name: parameter count}, "trainable_networks": {name: trainable count},
     "trainable": n, "frozen": n, "checkpoint_bytes": {"per_step": {item: bytes}, "per_step_total": bytes,
     "frozen_once": bytes}, "dtypes": {"params": .., "adam_mu": ..}}. Bytes are array data as orbax writes it
    (uncompressed): trainable parameters, EMA and optimizer state every step, frozen parameters once per run."""
    networks: Dict[str, int] = {}
    trainable: Dict[str, int] = {}
    for path, leaf in tree.flatten(s.abstract_params).items():
        count = math.prod(leaf.shape)
        networks[path[0]] = networks.get(path[0], 0) + count
        trainable[path[0]] = trainable.get(path[0], 0) + (count if s.opt.is_trainable(tree.path_str(path)) else 0)
    items, frozen_bytes = ckpt_lib.checkpoint_bytes(s)
    total_trainable = sum(trainable.values())
    return {
        "networks": networks, "trainable_networks": trainable, "trainable": total_trainable,
        "frozen": sum(networks.values()) - total_trainable,
        "checkpoint_bytes": {"per_step": items, "per_step_total": sum(items.values()), "frozen_once": frozen_bytes},
        "dtypes": {"params": np.dtype(s.policy.param_dtype).name, "adam_mu": np.dtype(s.policy.mu_dtype).name},
    }


def format_report(report: Dict[str, Any]) -> str:
    """The report as a text table: one row per network, then the totals and checkpoint sizes."""
    width = max(len(name) for name in report["networks"]) if report["networks"] else 7
    lines = [f"{'network':<{width}}  {'parameters':>15}  {'trainable':>15}"]
    for name, count in report["networks"].items():
        lines.append(f"{name:<{width}}  {count:>15,}  {report['trainable_networks'][name]:>15,}")
    sizes = report["checkpoint_bytes"]
    items = ", ".join(f"{name} {size / GIB:.2f}" for name, size in sizes["per_step"].items())
    lines += [f"{'total':<{width}}  {report['trainable'] + report['frozen']:>15,}  {report['trainable']:>15,}",
              f"frozen parameters: {report['frozen']:,}",
              f"checkpoint bytes per step: {sizes['per_step_total'] / GIB:.2f} GiB ({items}); frozen parameters once "
              f"per run: {sizes['frozen_once'] / GIB:.2f} GiB (params {report['dtypes']['params']}, Adam mu "
              f"{report['dtypes']['adam_mu']})"]
    return "\n".join(lines)
