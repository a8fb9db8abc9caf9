"""Exports a trained run to PyTorch formats, or imports a released original checkpoint into a new run directory.

Export (the run is only read; --config is optional, the run's saved config is used; nothing is overwritten):

    python export.py --workdir=runs/pcdm_inpaint --format=diffusers --output=exports/inpaint [--step=N] [--params=raw]
    python export.py --workdir=runs/pcdm_inpaint --format=original --output=exports/inpaint_original

Import (writes the new run directory --workdir, then sample.py / eval.py / export.py use it as a trained run):

    python export.py --import_original=PCDMs/stage2/mp_rank_00_model_states.pt \
        --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint_released
    python export.py --import_original=pidm/last.pt --format=pidm --config=configs/reposedm.py:B1 \
        --workdir=runs/pidm_released

The formats of each method are listed in its module's FORMATS (README, "Export and import").
"""

import sys

from absl import flags

from pgpis_jax import cli
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import exporting, importing

_FORMAT = flags.DEFINE_string("format", None, "Export: diffusers (diffusers / transformers directories and "
                              "safetensors) or original (the original repository's checkpoint layout), or a "
                              "method's own format (RePoseDM: pidm). Import: the format of the checkpoint "
                              "(default original).")
_OUTPUT = flags.DEFINE_string("output", None, "Export: the new directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Export: the checkpoint step (default: the newest).")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Export: the EMA parameters (where the run kept an "
                            "EMA) or the raw trained ones.")
_IMPORT = flags.DEFINE_string("import_original", None, "Import: a released original checkpoint (file or folder) "
                              "to write into the new run directory --workdir (needs --config).")


def export_main(config, workdir):
    if not _FORMAT.value:
        raise UserError("--format is required: diffusers or original")
    exporting.export_run(workdir, _FORMAT.value, _OUTPUT.value, config=config, step=_STEP.value,
                         which=_PARAMS.value)
    print(f"exported {workdir} ({_FORMAT.value}) to {_OUTPUT.value}")


def import_main(config, workdir):
    importing.import_original(config, workdir, _IMPORT.value, _FORMAT.value or "original")
    print(f"imported {_IMPORT.value} into {workdir}")


if __name__ == "__main__":
    if cli.flag_value(sys.argv, "import_original") is None:
        cli.run(export_main, inference=True)
    else:
        cli.run(import_main)
