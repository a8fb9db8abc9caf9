"""The parameter report of a config, from `jax.eval_shape` alone: no weights, no data, no accelerator.

    python -m pgpis_jax.inspect --config=configs/pcdm_inpaint.py[:arg] [--json] [--config.key=value ...]

Prints the parameters of every top-level network (all and trainable), the trainable and frozen totals and the bytes
of one checkpoint step in the configured dtypes; with --json as {"networks": {name: count}, "trainable_networks":
{...}, "trainable": n, "frozen": n, "checkpoint_bytes": {...}, "dtypes": {...}, "method": ..., "config": ...}, and for a
method that names groups of networks as its paper counts them (PARAMETER_GROUPS, e.g. CFLD's PRD = decoder + null
prompt) "groups": {label: {"parameters": n, "trainable": n}}.
Pretrained networks named by hub id are built from their published configs (pgpis_jax/weights/published.py), or
from the config.json of a local directory. Training logs the same table when it starts.
"""

from __future__ import annotations

import json

from absl import flags

from pgpis_jax import cli, methods
from pgpis_jax.methods.common.networks import DeclaredNetworks
from pgpis_jax.trainer import loop
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer import report as report_lib

_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON object.")


def config_report(config) -> dict:
    """The parameter report (trainer/report.py) of the stage `config` trains, built without weights or data."""
    method = methods.get_method(config.method).build(config, saved_networks=DeclaredNetworks(config))
    s = loop.setup(method, config, mesh_lib.make_mesh(config))
    report = {"method": config.method, **report_lib.parameter_report(s)}
    groups = getattr(method, "PARAMETER_GROUPS", {})
    if groups:
        report["groups"] = {label: {kind: sum(report[key].get(name, 0) for name in names)
                                    for kind, key in (("parameters", "networks"), ("trainable", "trainable_networks"))}
                            for label, names in groups.items()}
    return report


def main(config) -> None:
    report = config_report(config)
    if _JSON.value:
        print(json.dumps({**report, "config": flags.FLAGS[cli.CONFIG_FLAG].config_filename}, indent=2))
    else:
        print(f"{report['method']} ({flags.FLAGS[cli.CONFIG_FLAG].config_filename})")
        print(report_lib.format_report(report))
        for label, counts in report.get("groups", {}).items():
            print(f"{label}: {counts['parameters']:,} parameters, {counts['trainable']:,} trainable")


if __name__ == "__main__":
    cli.run_with_config(main)
