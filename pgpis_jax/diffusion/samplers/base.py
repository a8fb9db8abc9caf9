"""What every sampler shares: a host-side plan of per-step constants and one `lax.scan` over it.

A sampler turns `num_inference_steps` into a plan: NumPy arrays whose leading axis is the step (the
timestep visited and the float64-derived coefficients of that step's update). `sample` then runs the whole
reverse process as a single `lax.scan`, calling `model_fn(x_t, t)` once per step, so it jits and the loop
is compiled once however many steps it has.

Shapes: `x_T` is any array whose batch axis is 0 and channel axis is -1 (NHWC latents, [B, 1, D]
embeddings); the loop runs in float32 and returns float32.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.diffusion.forward import PREDICTION_TYPES
from pgpis_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
Plan = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler(abc.ABC):
    """Base of the reverse-process samplers. Subclasses define the plan and one step."""

    schedule: NoiseSchedule
    prediction_type: str = "epsilon"

    init_noise_sigma = 1.0

    def __post_init__(self):
        check_choice(type(self).__name__, "prediction_type", self.prediction_type, PREDICTION_TYPES)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @abc.abstractmethod
    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The descending integer timesteps visited, as diffusers' `set_timesteps` gives them."""

    @abc.abstractmethod
    def plan(self, num_inference_steps: int) -> Plan:
        """Per-step constants: arrays with leading axis num_inference_steps, including `timestep`."""

    @abc.abstractmethod
    def is_stochastic(self) -> bool:
        """Whether steps add fresh noise (then `sample` needs `rng` or `step_noise`)."""

    def init_state(self, x: jax.Array):
        """The scan carry before the first step; by default the sample alone."""
        return x

    def final_sample(self, state) -> jax.Array:
        """x_0 from the scan carry after the last step."""
        return state

    @abc.abstractmethod
    def step(self, model_fn: ModelFn, state, coefficients: Dict[str, jax.Array], noise: Optional[jax.Array]):
        """One reverse step: the carry after visiting coefficients['timestep']."""

    def sample(
        self,
        model_fn: ModelFn,
        x_T: jax.Array,
        rng: Optional[jax.Array] = None,
        num_inference_steps: int = 50,
        step_noise: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Runs the reverse process from x_T (scaled by `init_noise_sigma`) and returns x_0.

        model_fn(x_t, t): the raw network output for the batch x_t at the scalar int32 timestep t.
        rng: key for the per-step noise of stochastic samplers (step i uses fold_in(rng, i)).
        step_noise: alternatively the per-step standard-normal noise, shape [num_inference_steps, *x_T.shape];
          step i uses step_noise[i] where the diffusers scheduler would draw noise.
        """
        x = jnp.asarray(x_T, jnp.float32) * self.init_noise_sigma
        plan = {k: jnp.asarray(v) for k, v in self.plan(num_inference_steps).items()}
        num_steps = int(plan["timestep"].shape[0])
        stochastic = self.is_stochastic()
        if step_noise is not None:
            step_noise = jnp.asarray(step_noise, jnp.float32)
            if step_noise.shape != (num_steps,) + x.shape:
                raise ValueError(
                    f"step_noise has shape {step_noise.shape}; expected {(num_steps,) + x.shape} "
                    "(num_inference_steps, *x_T.shape)"
                )
        elif stochastic and rng is None:
            raise ValueError(f"{type(self).__name__} with these settings is stochastic: pass rng or step_noise")

        def body(state, inputs):
            index, coefficients, noise = inputs
            if stochastic and noise is None:
                noise = jax.random.normal(jax.random.fold_in(rng, index), x.shape, jnp.float32)
            return self.step(model_fn, state, coefficients, noise), None

        inputs = (jnp.arange(num_steps), plan, step_noise if stochastic else None)
        state, _ = jax.lax.scan(body, self.init_state(x), inputs)
        return self.final_sample(state)


def check_choice(owner: str, name: str, value, choices) -> None:
    """Raises a ValueError naming `owner`, the option and the accepted values when value is not in choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported by {owner}; expected one of {tuple(choices)}")


def split_variance_channels(model_output: jax.Array, sample: jax.Array, variance_type: str):
    """Splits a learned-variance model output [..., 2C] into (prediction [..., C], variance values [..., C])."""
    channels = sample.shape[-1]
    if model_output.shape[-1] != 2 * channels:
        raise ValueError(
            f"variance_type={variance_type!r} needs a model output with 2 x {channels} channels on the last axis "
            f"(prediction, variance); got shape {model_output.shape} for a sample of shape {sample.shape}"
        )
    return model_output[..., :channels], model_output[..., channels:]
