"""configs/pcdm_common.py `device_memory=<GB>`: the per-device plans follow bench/RESULTS.md's memory plan, and the
trainer splits the paper's global batches accordingly."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from configs import pcdm_common, pcdm_inpaint, pcdm_prior, pcdm_refine
from pgpis_jax.trainer import step as step_lib

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md"
USABLE = 0.9   # of a device's memory, as the plan's comment says


def measured_peaks():
    """{(stage, res, batch, sharded): peak GiB} of the memory-plan rows with remat none and chunked attention."""
    section = RESULTS.read_text().split("## bench/memory_plan.py", 1)[1].split("\n## ", 1)[0]
    peaks = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[2].startswith("pcdm_") and cells[5] == "none" and cells[6] == "chunked":
            sharded = bool(re.search(r"fsdp=\d+", cells[1]))
            peaks[(cells[2], int(cells[3]), int(cells[4]), sharded)] = float(cells[9])
    return peaks


@pytest.mark.parametrize("key", sorted(pcdm_common.DEVICE_MEMORY_PLANS, key=str))
def test_each_plan_is_the_largest_measured_batch_that_fits(key):
    stage, res, gb = key   # gb: GiB of HBM (TPU v5e 16, v4 32, A100 / H100 80)
    plan = pcdm_common.DEVICE_MEMORY_PLANS[key]
    peaks = measured_peaks()
    sharded = gb == 16
    fitting = [batch for (s, r, batch, sh), peak in peaks.items()
               if (s, r, sh) == (stage, res, sharded) and peak <= USABLE * gb]
    larger = [batch for (s, r, batch, sh) in peaks if (s, r, sh) == (stage, res, sharded)
              and batch > max(fitting, default=0)]
    assert plan == (max(fitting), -1 if sharded else 1)
    assert larger or max(fitting) == 8, f"{key}: the next larger batch is not measured"


@pytest.mark.parametrize("module, batch, devices, rows, steps", [
    (pcdm_inpaint, 128, 8, 4, 4), (pcdm_refine, 128, 8, 8, 2), (pcdm_refine, 128, 64, 8, 1)])
def test_the_global_batch_is_kept_and_split_into_micro_batches(module, batch, devices, rows, steps):
    """res 256 on a 32 GB device: stage 2 at 4 rows a device, stage 3 at 8 (see the plans)."""
    config = module.get_config("device_memory=32")
    assert config.batch_size == batch and config.grad.max_per_device_batch == rows and config.remat == "none"
    mesh = SimpleNamespace(shape={"data": devices, "fsdp": 1})
    assert step_lib.accumulation_steps(config, mesh) == steps


def test_sixteen_gigabytes_shard_the_state_over_all_devices():
    config = pcdm_refine.get_config("device_memory=16")
    assert (config.mesh.data, config.mesh.fsdp) == (1, -1)


@pytest.mark.parametrize("module, arg, message", [
    (pcdm_prior, "device_memory=32", "planned for stages 2 and 3"),
    (pcdm_inpaint, "device_memory=24", "planned for stages 2 and 3"),
    (pcdm_inpaint, "demo,device_memory=16", "not demo or market")])
def test_unplanned_settings_are_one_clear_error(module, arg, message):
    with pytest.raises(ValueError, match=message):
        module.get_config(arg)
