"""Classifier-free guidance rules: how the outputs of several conditioning branches combine into one.

Each rule takes branch outputs of equal shape (batch on axis 0) and returns the guided output. `guided`
turns a denoiser and one condition pytree per branch into a plain `model_fn(x_t, t)` for the samplers,
evaluating all branches in one batched call (as the reference pipelines do); stages name their conditional
and unconditional conditions and a rule, and never concatenate branches themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp


def classifier_free(uncond, cond, scale: float):
    """Standard CFG: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def cumulative(branches: Sequence[jax.Array], scales: Sequence[float]):
    """Cumulative multi-condition guidance: b_0 + sum_k scales[k-1] * (b_k - b_{k-1}).

    Branches are ordered from least to most conditioned; with two branches this is standard CFG.
    """
    if len(branches) != len(scales) + 1:
        raise ValueError(f"cumulative guidance needs one scale per branch after the first: got "
                         f"{len(branches)} branches and {len(scales)} scales")
    guided = branches[0]
    for previous, current, scale in zip(branches[:-1], branches[1:], scales):
        guided = guided + scale * (current - previous)
    return guided


def cfld(uncond, pose_only, full, pose_scale: float = 2.0, appearance_scale: float = 2.0):
    """CFLD's `uc_down_full` rule: uc + w_pose (down - uc) + w_app (full - down).

    uncond: null prompt, no pose residuals, no HGA bias; pose_only: null prompt with the target pose;
    full: every condition.
    """
    return cumulative([uncond, pose_only, full], [pose_scale, appearance_scale])


def fpdm(uncond, source, fused, scale: float = 2.0):
    """FPDM's three-branch rule with one scale: u + w (src - u) + w (global - src).

    uncond: no pose, context or fusion; source: pose and DINOv2 context; fused: also the fusion embedding.
    """
    return cumulative([uncond, source, fused], [scale, scale])


def rescale(guided, cond, guidance_rescale: float):
    """`guidance_rescale` (Lin et al. 2023, Sec. 3.4): match the per-sample std of the guided output to the
    conditional one, then blend: phi * guided * std(cond) / std(guided) + (1 - phi) * guided.

    Standard deviations are over all non-batch axes with Bessel's correction, as diffusers computes them.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def pcdm(uncond, cond, scale: float = 2.0, guidance_rescale: float = 0.0):
    """PCDMs' pipelines: CFG only when scale > 1 (else the conditional output alone), then the optional
    `guidance_rescale` (the released stage-3 script passes guidance_rescale = scale)."""
    if scale <= 1.0:
        return cond
    guided = classifier_free(uncond, cond, scale)
    if guidance_rescale > 0.0:
        guided = rescale(guided, cond, guidance_rescale)
    return guided


def guided(denoise: Callable, conditions: Sequence[Any], combine: Optional[Callable] = None) -> Callable:
    """A sampler's `model_fn(x_t, t)` from `denoise(x, t, condition)` and one condition pytree per branch
    (ordered as `combine` takes them, e.g. (uncond, cond)).

    With one branch: denoise(x_t, t, conditions[0]). With several: one call of `denoise` on all branches
    batched along axis 0 (x_t repeated, each condition leaf concatenated branch-major, as the reference
    pipelines batch them), then combine(*branch_outputs)."""
    conditions = list(conditions)
    if len(conditions) == 1:
        return lambda x_t, t: denoise(x_t, t, conditions[0])
    if combine is None:
        raise ValueError("several guidance branches need a combine rule")
    count = len(conditions)
    batched = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conditions)

    def model_fn(x_t, t):
        outputs = denoise(jnp.concatenate([x_t] * count, axis=0), t, batched)
        return combine(*jnp.split(outputs, count, axis=0))

    return model_fn
