"""optax from the config: AdamW / Adam, learning-rate schedules, gradient clipping, frozen groups.

Trainable and frozen parameters are chosen by regexes on parameter paths (config.param_groups); the
optimizer is an `optax.multi_transform` whose frozen branch is `set_to_zero`, so frozen parameters hold no
optimizer state (their slots are optax `MaskedNode`s) and are never updated. Clipping sees only the
trainable gradients. Gradient accumulation is done by the train step (pgpis_jax/trainer/step.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping

import jax.numpy as jnp
import optax

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import tree

SCHEDULES = ("constant", "linear_warmup", "step_decay")
OPTIMIZERS = ("adamw", "adam")
TRAINABLE, FROZEN = "trainable", "frozen"


def learning_rate_schedule(config) -> Callable:
    """lr(s) for the update at 0-based step s, from config.optimizer and config.lr_schedule.

    constant:       base
    linear_warmup:  base * (f + (1 - f) * (s + 1) / W) for s < W, then base
    step_decay:     the warm-up factor (1 after warm-up, or when W = 0) times
                    decay_factor ** (number of decay_boundaries <= s)   (CFLD's WarmupMultiStepLR)
    """
    base = float(config.optimizer.learning_rate)
    kind = config.optimizer.schedule
    s = config.lr_schedule
    warmup, start = int(s.warmup_steps), float(s.warmup_start_factor)
    boundaries = tuple(int(b) for b in s.decay_boundaries)
    if kind not in SCHEDULES:
        raise UserError(f"config.optimizer.schedule {kind!r} is not supported; expected one of {SCHEDULES}")
    if warmup < 0 or list(boundaries) != sorted(boundaries):
        raise UserError(f"config.lr_schedule: warmup_steps must be >= 0 and decay_boundaries increasing, got "
                        f"{warmup} and {boundaries}")
    if kind == "constant" and (warmup or boundaries):
        raise UserError("config.optimizer.schedule is 'constant' but config.lr_schedule sets warm-up or decay "
                        f"(warmup_steps={warmup}, decay_boundaries={boundaries}); use 'linear_warmup' or "
                        "'step_decay'")
    if kind == "linear_warmup" and (warmup == 0 or boundaries):
        raise UserError("config.optimizer.schedule 'linear_warmup' needs config.lr_schedule.warmup_steps > 0 and "
                        "no decay_boundaries (use 'step_decay' for decay)")
    if kind == "constant":
        return optax.constant_schedule(base)
    decay = float(s.decay_factor)
    bounds = jnp.asarray(boundaries if boundaries else (0,), jnp.int32)

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        lr = jnp.asarray(base, jnp.float32)
        if warmup:
            ramp = start + (1.0 - start) * (count + 1).astype(jnp.float32) / warmup
            lr = lr * jnp.where(count < warmup, ramp, 1.0)
        if boundaries:
            passed = jnp.sum(count >= bounds).astype(jnp.float32)
            lr = lr * jnp.asarray(decay, jnp.float32) ** passed
        return lr

    return schedule


def trainable_paths(abstract_params: Mapping, config) -> Dict[str, bool]:
    """{path: trainable?}. A pattern that matches no parameter, or no trainable parameter at all, is an
    error naming the pattern (a typo would otherwise silently train or freeze the wrong thing)."""
    groups = config.param_groups
    paths = tree.leaf_paths(abstract_params)
    result = {}
    compiled = {}
    for kind in (TRAINABLE, FROZEN):
        patterns = list(groups[kind])
        compiled[kind] = tree.compile_patterns(patterns, f"config.param_groups.{kind}")
        for pattern, c in zip(patterns, compiled[kind]):
            if not any(c.fullmatch(p) for p in paths):
                examples = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
                raise UserError(f"config.param_groups.{kind} pattern {pattern!r} matches no parameter "
                                f"(patterns match whole paths such as {examples})")
    for p in paths:
        result[p] = tree.matches_any(p, compiled[TRAINABLE]) and not tree.matches_any(p, compiled[FROZEN])
    if not any(result.values()):
        raise UserError("config.param_groups leaves no trainable parameter")
    return result


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformation
    schedule: Callable
    trainable: Dict[str, bool]   # path -> trainable?

    def is_trainable(self, path: str) -> bool:
        return self.trainable[path]

    def split(self, params: Mapping):
        """(trainable sub-tree, frozen sub-tree)."""
        return (tree.select(params, lambda p: self.trainable[p]),
                tree.select(params, lambda p: not self.trainable[p]))


def _trainable_transform(config, schedule, mu_dtype) -> optax.GradientTransformation:
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        raise UserError(f"config.optimizer.name {o.name!r} is not supported; expected one of {OPTIMIZERS}")
    parts = []
    if config.grad.clip_norm < 0:
        raise UserError(f"config.grad.clip_norm must be >= 0 (0 = off), got {config.grad.clip_norm}")
    if config.grad.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(config.grad.clip_norm)))
    if o.name == "adam" and o.weight_decay:
        parts.append(optax.add_decayed_weights(float(o.weight_decay)))   # torch.optim.Adam: L2 in the gradient
    parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype))
    if o.name == "adamw" and o.weight_decay:
        parts.append(optax.add_decayed_weights(float(o.weight_decay)))   # decoupled, as torch.optim.AdamW
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def make_optimizer(config, abstract_params: Mapping, mu_dtype=None) -> Optimizer:
    schedule = learning_rate_schedule(config)
    trainable = trainable_paths(abstract_params, config)
    labels = tree.unflatten({path: (TRAINABLE if trainable[tree.path_str(path)] else FROZEN)
                             for path in tree.flatten(abstract_params)})
    tx = optax.multi_transform({TRAINABLE: _trainable_transform(config, schedule, mu_dtype),
                                FROZEN: optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=schedule, trainable=trainable)
