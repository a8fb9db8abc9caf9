"""The training state and the train step, method-agnostic.

State (a plain dict): {"step": int32, "params" (all, trainable and frozen), "opt_state", "ema" (trainable
leaves, or {}), "rng": uint32 key data}. checkpoints.split_state saves it as separate items: the trainable
params, ema, opt_state and {step, rng} per checkpoint step, the frozen params once per run. One update:

    rng       = fold_in(key(state.rng), state.step)
    grads     = d loss / d trainable params, the mean over k micro-batches (`accumulation_steps`: config.grad.
                accumulation_steps, or derived from config.grad.max_per_device_batch; lax.scan; micro-batch j
                holds rows j, j+k, j+2k, ... so every device keeps its rows)
    updates   = optax (clip, Adam/AdamW, schedule) on the trainable params; frozen ones pass through
    ema       = decay * ema + (1 - decay) * params
    metrics   = loss, grad_norm (before clipping), learning_rate (of this update), method aux scalars
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import ema as ema_lib
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer import tree
from pgpis_jax.trainer.optimizer import Optimizer
from pgpis_jax.trainer.precision import Policy

State = Dict[str, Any]


def init_params_fn(method, policy: Policy) -> Callable:
    """rng -> parameters in param_dtype (traced under jit with out_shardings)."""

    def init(rng):
        params = method.init(rng)
        tree.flatten(params)  # a clear error if it is not a nested dict of arrays
        return policy.cast_params(params)

    return init


def init_rest_fn(opt: Optimizer, use_ema: bool) -> Callable:
    """(params, rng key data) -> the full initial state."""

    def init(params, rng_data):
        trainable, _ = opt.split(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.tx.init(params),
                "ema": ema_lib.init(trainable) if use_ema else {}, "rng": rng_data}

    return init


def accumulation_steps(config, mesh) -> int:
    """Micro-batches per update. config.grad.accumulation_steps, unless config.grad.max_per_device_batch = n > 0:
    then the fewest micro-batches that split config.batch_size evenly over the batch-axis devices with at most n
    rows per device each (so one config fits a device's memory on any number of devices)."""
    limit = int(config.grad.get("max_per_device_batch", 0))
    if limit <= 0:
        return int(config.grad.accumulation_steps)
    if config.grad.accumulation_steps != 1:
        raise UserError(f"config.grad.max_per_device_batch={limit} derives the accumulation steps: leave "
                        f"config.grad.accumulation_steps at 1 (got {config.grad.accumulation_steps})")
    ways = mesh_lib.batch_devices(mesh, config)
    per_device = config.batch_size // ways
    if config.batch_size % ways:
        raise UserError(f"config.batch_size {config.batch_size} must be divisible by the {ways} devices of the batch "
                        f"axes {tuple(config.mesh.batch_axes)}")
    return next(k for k in range(1, per_device + 1) if per_device % k == 0 and per_device // k <= limit)


def check_batch_split(config, mesh) -> None:
    k = accumulation_steps(config, mesh)
    ways = mesh_lib.batch_devices(mesh, config)
    if k < 1:
        raise UserError(f"config.grad.accumulation_steps must be >= 1, got {k}")
    if config.batch_size % (ways * k):
        raise UserError(f"config.batch_size {config.batch_size} must be divisible by the {ways} devices of the batch "
                        f"axes {tuple(config.mesh.batch_axes)} times config.grad.accumulation_steps {k}")


def make_train_step(method, opt: Optimizer, config, mesh) -> Callable[[State, Mapping], Tuple[State, Dict]]:
    """The (unjitted) train step for `method`; see the module docstring."""
    k = accumulation_steps(config, mesh)
    decay = float(config.ema.decay)
    nan_at_step = int(config.debug.nan_at_step)

    def micro_batches(batch):
        def split(x):
            x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
            x = jnp.moveaxis(x, 1, 0)
            spec = mesh_lib.batch_spec(config, x.ndim - 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *spec)))

        return jax.tree.map(split, batch)

    def train_step(state: State, batch: Mapping) -> Tuple[State, Dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        trainable, frozen = opt.split(state["params"])

        def loss_of(trainable_params, micro):
            loss, aux = method.loss_fn(tree.merge(trainable_params, frozen), micro, rng)
            loss = jnp.asarray(loss, jnp.float32)
            if nan_at_step > 0:  # debug: a NaN in the loss and, through it, in every gradient
                loss = loss * jnp.where(step + 1 == nan_at_step, jnp.nan, 1.0).astype(jnp.float32)
            return loss, {name: jnp.asarray(value, jnp.float32) for name, value in dict(aux).items()}

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if k == 1:
            (loss, aux), grads = grad_fn(trainable, batch)
        else:
            micro = micro_batches(batch)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_shape = jax.eval_shape(loss_of, trainable, first)[1]
            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable), jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape))

            def body(carry, mb):
                g_sum, l_sum, a_sum = carry
                (l, a), g = grad_fn(trainable, mb)
                return (jax.tree.map(lambda s, x: s + x.astype(jnp.float32), g_sum, g), l_sum + l,
                        jax.tree.map(jnp.add, a_sum, a)), None

            (g_sum, l_sum, a_sum), _ = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), g_sum, trainable)
            loss, aux = l_sum / k, jax.tree.map(lambda a: a / k, a_sum)

        grad_norm = optax.global_norm(grads)
        full_grads = tree.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = opt.tx.update(full_grads, state["opt_state"], state["params"])
        new_trainable = optax.apply_updates(trainable, opt.split(updates)[0])
        new_state = {"step": step + 1, "params": tree.merge(new_trainable, frozen), "opt_state": opt_state,
                     "ema": ema_lib.update(state["ema"], new_trainable, decay) if state["ema"] else state["ema"],
                     "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(opt.schedule(step), jnp.float32), **aux}
        return new_state, metrics

    return train_step


def with_device_decode(train_step, decode):
    """The train step on batches that travel encoded (e.g. uint8 levels; `InputPipeline.device_decode`): `decode`
    runs first, inside the same jit, on the sharded global batch. None: the step unchanged."""
    if decode is None:
        return train_step

    def decoded_train_step(state: State, batch: Mapping) -> Tuple[State, Dict]:
        return train_step(state, decode(batch))

    return decoded_train_step


def jit_train_step(train_step, state_shardings, batch_shardings, mesh):
    """One jitted step with explicit shardings; the state argument is donated."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
