"""Sharding: the trainer's step on 8 fake CPU devices (mesh data=8; data=2 x fsdp=4; the latter also with
2 accumulated micro-batches) gives the parameters, EMA and losses of the same steps on one device; the
fsdp rule shards large kernels and their Adam moments; explicit rules and their errors. One subprocess
(the fake device count is fixed when JAX starts), one test, so that pytest-xdist runs it once."""

import json
import subprocess
import sys

import pytest

from tests.trainer_utils import ROOT, env

pytestmark = pytest.mark.slow   # end-to-end (README, Tests: `make test` leaves these out)


def test_sharded_steps_equal_one_device_and_follow_the_rules():
    result = subprocess.run([sys.executable, "-m", "tests.trainer_multidevice"], cwd=ROOT, capture_output=True,
                            text=True, env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    for mesh in ("data8", "data2_fsdp4", "data2_fsdp4_accum2"):
        assert out[mesh]["max_param_diff"] < 1e-5, (mesh, out[mesh]["max_param_diff"])
        assert out[mesh]["max_ema_diff"] < 1e-5, mesh
        assert out[mesh]["max_loss_diff"] < 1e-5, mesh

    specs = out["data2_fsdp4"]["specs"]
    assert specs["blocks_0/dense_in/kernel"] == "P('fsdp', None)"       # [128, 128]: first of equal dims
    assert specs["dense_out/kernel"] == "P(None, 'fsdp')"               # [128, 192]: the larger dim
    assert specs["dense_in/bias"] == "P()"                              # below fsdp_min_size
    assert set(out["data2_fsdp4"]["moment_specs"]) == {"P('fsdp', None)", "P(None, 'fsdp')", "P()"}
    assert set(out["data8"]["specs"].values()) == {"P()"}               # fsdp axis of size 1: replicated

    assert out["explicit_rule_specs"]["dense_in/kernel"] == "P(None, 'fsdp')"
    assert out["explicit_rule_specs"]["dense_out/kernel"] == "P()"
    assert "dense_in/kernel" in out["bad_rule_error"] and "(192, 128)" in out["bad_rule_error"]

    # One process writes each replicated array whole (pgpis_jax/trainer/replica_writes.py): no slice is compiled.
    assert out["replicated_checkpoint"] == {"slice_compiles": 0, "step": 1, "max_param_diff": 0.0}
