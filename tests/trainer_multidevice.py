"""Run by tests/test_trainer_sharding.py in a subprocess with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): the same training steps of the toy method on one
device and on meshes data=8 and data=2 x fsdp=4 (and with gradient accumulation), through the trainer's
own setup, sharded init, global-batch assembly and jitted donated step; and a checkpoint of the state replicated
over the 8 devices through the trainer's Checkpoints. Prints one JSON line."""

import json
import sys
import tempfile

import jax
import numpy as np

from configs import toy_denoiser as toy_config
from pgpis_jax.errors import UserError
from pgpis_jax.methods import toy_denoiser
from pgpis_jax.trainer import checkpoints as ckpt_lib, loop, mesh as mesh_lib, step as step_lib, tree
from pgpis_jax.trainer.data import HostData

STEPS = 3


def config_for(data, fsdp, accumulation=1):
    config = toy_config.get_config("demo")
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.grad.accumulation_steps = accumulation
    config.ema.decay = 0.9
    config.grad.clip_norm = 1.0
    return config


def run(data, fsdp, devices, accumulation=1):
    config = config_for(data, fsdp, accumulation)
    method = toy_denoiser.build(config)
    mesh = mesh_lib.make_mesh(config, devices)
    s = loop.setup(method, config, mesh)
    state = loop.init_state(s, method, config)
    host = HostData(method.train_iterator(0, 1), mesh, config)
    first = host.next_host_batch()
    step = step_lib.jit_train_step(s.train_step, s.state_shardings, host.shardings(first), mesh)
    losses, batch = [], host.to_global(first)
    for i in range(STEPS):
        if i:
            batch = host.to_global(host.next_host_batch())
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    specs = {tree.path_str(p): str(leaf.sharding.spec) for p, leaf in tree.flatten(state["params"]).items()}
    mu_specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(state["opt_state"]) if leaf.ndim == 2})
    flat = {tree.path_str(p): np.asarray(leaf) for p, leaf in tree.flatten(state["params"]).items()}
    ema = {tree.path_str(p): np.asarray(leaf) for p, leaf in tree.flatten(state["ema"]).items()}
    return flat, ema, losses, specs, mu_specs


def replicated_checkpoint(devices):
    """The toy state (mesh data=8: every array on all 8 devices) saved by the trainer's Checkpoints and restored:
    the XLA compiles of eager slices during the save (orbax's replica-parallel writing cuts one slice per replica)
    and the largest difference of the restored parameters."""
    config = config_for(len(devices), 1)
    method = toy_denoiser.build(config)
    s = loop.setup(method, config, mesh_lib.make_mesh(config, devices))
    state = loop.init_state(s, method, config)
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, fun_name="", **_: compiled.append(fun_name)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = ckpt_lib.Checkpoints(workdir, config, s)
        checkpoints.save(1, state, {"batches_consumed": 0})
        checkpoints.close()
        slices = compiled.count("jit(slice)")
        restored, _, step = ckpt_lib.Checkpoints(workdir, config, s, read_only=True).restore()
    params = [{tree.path_str(p): np.asarray(leaf) for p, leaf in tree.flatten(x["params"]).items()}
              for x in (state, restored)]
    return {"slice_compiles": slices, "step": step, "max_param_diff": max_diff(*params)}


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    ref, ref_ema, ref_losses, ref_specs, _ = run(1, 1, devices[:1])
    out = {"reference_losses": ref_losses}
    for name, (data, fsdp, k) in {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1),
                                  "data2_fsdp4_accum2": (2, 4, 2)}.items():
        params, ema, losses, specs, mu_specs = run(data, fsdp, devices, k)
        out[name] = {"max_param_diff": max_diff(ref, params), "max_ema_diff": max_diff(ref_ema, ema),
                     "max_loss_diff": max(abs(a - b) for a, b in zip(ref_losses, losses)),
                     "specs": specs, "moment_specs": mu_specs}
    out["reference_specs"] = ref_specs
    config = config_for(2, 4)
    config.mesh.rules = (("dense_in/kernel", "(None, None, 'data')"), (".*", "fsdp"))
    try:
        run_config = toy_denoiser.build(config)
        loop.setup(run_config, config, mesh_lib.make_mesh(config, devices))
        out["bad_rule_error"] = None
    except UserError as error:
        out["bad_rule_error"] = str(error)
    config.mesh.rules = (("dense_in/kernel", "(None, 'fsdp')"), (".*", "replicated"))
    s = loop.setup(toy_denoiser.build(config), config, mesh_lib.make_mesh(config, devices))
    out["explicit_rule_specs"] = {tree.path_str(p): str(sh.spec) for p, sh in tree.flatten(s.param_shardings).items()}
    out["replicated_checkpoint"] = replicated_checkpoint(devices)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
