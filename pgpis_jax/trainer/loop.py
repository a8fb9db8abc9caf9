"""The training loop: set up the mesh and the sharded state, resume or initialise, run the jitted
donated step over global batches, log, checkpoint, stop cleanly on preemption or a non-finite loss.

    python train.py --config=configs/toy_denoiser.py --workdir=runs/toy

`train(method, config, workdir)` is what train.py runs (pgpis_jax.cli.run_method) for every method.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from pgpis_jax import config_checks
from pgpis_jax.errors import UserError
from pgpis_jax.trainer import checkpoints as ckpt_lib
from pgpis_jax.trainer import ema as ema_lib
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer import metrics as metrics_lib
from pgpis_jax.trainer import optimizer as opt_lib
from pgpis_jax.trainer import report as report_lib
from pgpis_jax.trainer import step as step_lib
from pgpis_jax.trainer.batched_threefry import with_batched_threefry
from pgpis_jax.trainer.data import HostData
from pgpis_jax.trainer.precision import Policy

SAMPLE_KEY_SALT = 0x5A3F1E
# Exit status of train.py after SIGTERM or a preemption notice, once the checkpoint of the current step is saved
# (EX_TEMPFAIL: a temporary failure; rerunning the same command resumes).
PREEMPTED_EXIT_CODE = 75


@dataclasses.dataclass
class Setup:
    """Everything about a run that depends on config, method and mesh but not on data or checkpoints."""

    mesh: Mesh
    policy: Policy
    opt: opt_lib.Optimizer
    abstract_params: Any
    param_shardings: Any
    state_shardings: Any
    abstract_state: Any          # ShapeDtypeStructs carrying the state shardings (restore target)
    train_step: Callable         # unjitted
    init_params: Callable
    init_rest: Callable


def setup(method, config, mesh: Mesh) -> Setup:
    """Shapes via jax.eval_shape, shardings from the config's rules; nothing is materialised."""
    policy = Policy.from_config(config)
    step_lib.check_batch_split(config, mesh)
    init_params = step_lib.init_params_fn(method, policy)
    abstract_params = jax.eval_shape(init_params, jax.random.key(0))
    opt = opt_lib.make_optimizer(config, abstract_params, mu_dtype=policy.mu_dtype)
    use_ema = ema_lib.enabled(config)
    init_rest = step_lib.init_rest_fn(opt, use_ema)
    rng_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    abstract_state = jax.eval_shape(init_rest, abstract_params, rng_data)
    param_shardings = mesh_lib.param_shardings(abstract_params, mesh, config)
    state_shardings = mesh_lib.state_shardings(abstract_state, abstract_params, param_shardings, mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
    return Setup(mesh=mesh, policy=policy, opt=opt, abstract_params=abstract_params,
                 param_shardings=param_shardings, state_shardings=state_shardings, abstract_state=abstract_state,
                 train_step=step_lib.make_train_step(method, opt, config, mesh), init_params=init_params,
                 init_rest=init_rest)


def _initial_keys(config):
    """(parameter key, training key) of a fresh run."""
    return jax.random.split(jax.random.key(config.seed))


def initial_params(s: Setup, method, config, provided: Optional[Dict[str, Any]] = None):
    """The parameters a fresh run starts from, created already sharded: jit(init, out_shardings=...) with the
    run's seed (its Threefry hashes merged by `with_batched_threefry`: the same bits, a faster compile), then the
    method's warm start, in param_dtype.

    `provided`: {top-level network: parameters} that take the place of fresh ones (an imported checkpoint's, in
    the dtypes of `s.abstract_params`). Their initialisers are left out of the compiled init (the other networks
    get the same values as without `provided`), and they are put back after the warm start, which may load
    pretrained weights into any network."""
    provided = dict(provided or {})
    fresh = [name for name in s.abstract_params if name not in provided]

    def init_fresh(rng):
        params = s.init_params(rng)
        return {name: params[name] for name in fresh}

    params = jax.jit(with_batched_threefry(init_fresh),
                     out_shardings={name: s.param_shardings[name] for name in fresh})(_initial_keys(config)[0])
    params = dict(params, **provided) if provided else params
    warm = method.warm_start(params)
    if warm is not params or provided:
        params = jax.device_put(s.policy.cast_params(dict(warm, **provided)), s.param_shardings)
    return params


def init_state(s: Setup, method, config) -> Dict[str, Any]:
    """A fresh state: initial_params, then the optimizer state, EMA and training key."""
    rng_data = jax.random.key_data(_initial_keys(config)[1])
    return jax.jit(s.init_rest, out_shardings=s.state_shardings)(initial_params(s, method, config), rng_data)


def _mean_metrics(window) -> Dict[str, float]:
    fetched = jax.device_get(window)
    out = {}
    for name in fetched[0]:
        values = [float(m[name]) for m in fetched]
        out[name] = values[-1] if name == "learning_rate" else float(np.mean(values))
    return out


def train(method, config, workdir: str) -> str:
    """Trains `method` to config.total_steps in `workdir`, resuming from its newest checkpoint.

    Returns "done", "preempted" (a checkpoint was saved; rerun to continue; train.py exits with
    PREEMPTED_EXIT_CODE) or "already_done". Raises UserError for bad configs and workdirs, unusable checkpoints,
    a full disk and non-finite losses (metrics.NonFiniteLoss).

    Nothing is written before the first train step has compiled (config.json, run files, logs); a fresh run that
    fails before its first checkpoint is committed removes what it created, so the corrected rerun starts clean.
    """
    metrics_lib.quiet_library_logs()
    mesh_lib.maybe_initialize_distributed(config)
    config_checks.check(config)
    ckpt_lib.check_workdir(workdir)
    rewrite_config = ckpt_lib.check_recorded_config(config, workdir)
    new_run_files = ckpt_lib.check_run_files(method.run_files(), workdir)
    mesh = mesh_lib.make_mesh(config)
    s = setup(method, config, mesh)
    report = report_lib.parameter_report(s)
    micro_batches = step_lib.accumulation_steps(config, mesh)
    metrics_lib.console(f"mesh {mesh_lib.describe(mesh)}, {jax.process_count()} process(es); parameters: "
                        f"{report['trainable']:,} trainable, {report['frozen']:,} frozen; global batch "
                        f"{config.batch_size} in {micro_batches} micro-batch(es); precision "
                        f"{config.precision.param_dtype} params / {config.precision.compute_dtype} compute")
    metrics_lib.console(report_lib.format_report(report))
    created_by_others = _entries(workdir)
    checkpoints = ckpt_lib.Checkpoints(workdir, config, s)
    fresh = not checkpoints.all_steps()
    outputs = _Outputs(checkpoints)
    try:
        result = _segment(method, config, workdir, s, checkpoints, outputs, rewrite_config, new_run_files)
        outputs.close()   # waits for an in-flight save, so the last good checkpoint is complete
        return result
    except BaseException as error:
        outputs.close(quietly=True)
        if fresh and not checkpoints.all_steps():
            _remove_created(workdir, created_by_others)
        if isinstance(error, Exception) and ckpt_lib.out_of_space(error):
            raise UserError(checkpoints.out_of_space_message(error, s)) from None
        raise


class _Outputs:
    """What a training segment keeps open: the checkpoint manager, the metric writer, the SIGTERM handler."""

    def __init__(self, checkpoints):
        self.checkpoints, self.writer, self.preemption = checkpoints, None, None

    def close(self, quietly: bool = False) -> None:
        """Restores the SIGTERM handler, waits for the last save and closes the writer (each once). quietly:
        after a failure, whose report matters more than a second error while closing (logged only)."""
        try:
            if self.preemption is not None:
                self.preemption, preemption = None, self.preemption
                preemption.close()
            if self.writer is not None:
                self.writer, writer = None, self.writer
                writer.flush()
                writer.close()
            self.checkpoints.close(remove_incomplete=quietly)
        except Exception:  # noqa: BLE001 - see the docstring
            if not quietly:
                raise
            logging.debug("while closing the run's outputs after a failure", exc_info=True)


def _entries(workdir: str) -> Optional[set]:
    """The names in `workdir`, or None if it does not exist."""
    path = epath.Path(workdir)
    return {child.name for child in path.iterdir()} if path.is_dir() else None


def _remove_created(workdir: str, before: Optional[set]) -> None:
    """Removes what this process created in `workdir` (all of it if it did not exist): a fresh run that failed
    before its first checkpoint leaves the directory as it found it (process 0)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    if before is None:
        if path.exists():
            path.rmtree()
        return
    for child in path.iterdir():
        if child.name not in before:
            child.rmtree() if child.is_dir() else child.unlink()


def _segment(method, config, workdir: str, s: Setup, checkpoints, outputs: _Outputs, rewrite_config: bool,
             new_run_files) -> str:
    """Restores or initialises the state, compiles the step, then records the config and trains."""
    host = HostData(method.train_iterator(jax.process_index(), jax.process_count()), s.mesh, config)
    restored = checkpoints.restore()
    if restored is not None:
        state, data_state, start = restored
        host.set_state(data_state)
        metrics_lib.console(f"resumed from checkpoint step {start} in {checkpoints.directory}")
    else:
        state, start = init_state(s, method, config), 0
        metrics_lib.console(f"no checkpoint in {checkpoints.directory}: starting from step 0")
    if start >= config.total_steps:
        _record(config, workdir, rewrite_config, new_run_files)
        metrics_lib.console(f"already trained to step {start} >= config.total_steps {config.total_steps}; "
                            "nothing to do")
        return "already_done"
    host_batch = host.next_host_batch()
    batch = host.to_global(host_batch)
    t0 = time.perf_counter()
    train_step = step_lib.with_device_decode(s.train_step, host.device_decode)
    jitted = step_lib.jit_train_step(train_step, s.state_shardings, host.shardings(host_batch), s.mesh)
    compiled = jitted.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    metrics_lib.console(f"compiled the train step in {compile_seconds:.1f}s")
    sampler = _make_sampler(method, config, s) if config.logging.sample_every_steps > 0 else None
    _record(config, workdir, rewrite_config, new_run_files)
    outputs.writer = metrics_lib.make_writer(workdir, config)
    outputs.preemption = ckpt_lib.PreemptionWatch(bool(config.checkpoint.save_on_preemption))
    return _run(config, workdir, s, state, start, host, batch, compiled, compile_seconds, sampler, checkpoints,
                outputs.writer, outputs.preemption)


def _record(config, workdir: str, rewrite_config: bool, new_run_files) -> None:
    """config.json (when new or changed in resumable keys) and the method's run files not recorded yet."""
    if rewrite_config:
        ckpt_lib.write_config(config, workdir)
    ckpt_lib.write_run_files(new_run_files, workdir)


def _run(config, workdir, s: Setup, state, start, host, batch, compiled, compile_seconds, sampler, checkpoints,
         writer, preemption) -> str:
    total = int(config.total_steps)
    mesh = s.mesh
    progress = metrics_lib.Progress(start, total, config.batch_size, mesh.devices.size)
    writers = metrics_lib.Writers([writer, metrics_lib.ConsoleWriter(progress)])
    step = start
    window = []
    pending: Optional[tuple] = None
    last_checkpoint = checkpoints.latest_step()
    first = True
    while step < total:
        if preemption.reached(step, checkpoints.manager):
            if pending is not None:
                metrics_lib.check_finite(pending[0], jax.device_get(pending[1]), last_checkpoint,
                                         checkpoints.directory)
            checkpoints.save(step, state, host.get_state())
            checkpoints.wait()
            metrics_lib.console(f"preempted: saved a checkpoint at step {step} in {checkpoints.directory}; rerun the "
                                f"same command to resume (exit status {PREEMPTED_EXIT_CODE})")
            return "preempted"
        if not first:
            batch = host.to_global(host.next_host_batch())
        first = False
        state, metrics = compiled(state, batch)
        step += 1
        if pending is not None:  # the previous step has finished by now or soon; the device stays busy
            metrics_lib.check_finite(pending[0], jax.device_get(pending[1]), last_checkpoint, checkpoints.directory)
            progress.step_done(pending[0])
        pending = (step, metrics)
        window.append(metrics)
        log_now = step % config.log_every_steps == 0 or step == total
        save_now = step % config.checkpoint_every_steps == 0 or step == total
        sample_now = sampler is not None and (step % config.logging.sample_every_steps == 0 or step == total)
        if log_now or save_now or sample_now:  # nothing is logged or saved before its step is known finite
            metrics_lib.check_finite(step, jax.device_get(metrics), last_checkpoint, checkpoints.directory)
            progress.step_done(step)
            pending = None
        if log_now:
            scalars = {f"train/{k}": v for k, v in _mean_metrics(window).items()}
            scalars.update(progress.window(step))
            scalars.update(metrics_lib.device_memory())
            if step - start <= config.log_every_steps:
                scalars["perf/compile_time_s"] = compile_seconds
            writers.write_scalars(step, scalars)
            window = []
        if save_now:
            checkpoints.save(step, state, host.get_state())
            last_checkpoint = step
        if sample_now:
            grid = sampler(state, step)
            writers.write_images(step, {"samples": grid[None]})
            if jax.process_index() == 0:
                metrics_lib.save_png(epath.Path(workdir) / "samples" / f"step_{step:08d}.png", grid)
        if save_now or sample_now:
            progress.restart_window(step)
        if config.debug.step_delay_seconds > 0:
            time.sleep(config.debug.step_delay_seconds)
    checkpoints.wait()
    metrics_lib.console(f"done: trained to step {step}; checkpoint in {checkpoints.directory / str(step)}")
    return "done"


def _make_sampler(method, config, s: Setup):
    """(state, step) -> uint8 image grid of method.sample_fn on method.preview_batch, with the EMA
    parameters when there are any, and the same noise at every step."""
    preview = method.preview_batch(int(config.logging.num_samples))
    if preview is None:
        logging.warning("config.logging.sample_every_steps is set but method %s has no preview_batch; no grids",
                        type(method).__name__)
        return None
    replicated = mesh_lib.replicated(s.mesh)
    preview = jax.device_put(preview, replicated)
    key = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_KEY_SALT)

    @jax.jit
    def sample(params, ema, batch, rng):
        images = method.sample_fn(ema_lib.eval_params(params, ema), batch, rng)
        return jax.lax.with_sharding_constraint(images, replicated)

    def run(state, step):
        images = sample(state["params"], state["ema"], preview, key)
        return metrics_lib.image_grid(np.asarray(jax.device_get(images)))

    return run
