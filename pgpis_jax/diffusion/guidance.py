"""Classifier-free guidance rules: how the outputs of several conditioning branches combine into one.

Each rule takes branch outputs of equal shape (batch on axis 0) and returns the guided output. `guided`
turns a network evaluated on all branches at once (batched along axis 0, as the reference pipelines do)
into a plain `model_fn(x_t, t)` for the samplers.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


def guided(batched_model_fn: Callable, num_branches: int, combine: Callable) -> Callable:
    """A `model_fn(x_t, t)` that evaluates `batched_model_fn` once on num_branches copies of x_t stacked
    along axis 0 (branch-major, the conditions for each branch being the model's concern), splits the
    output into the branches and returns combine(*branch_outputs)."""

    def model_fn(x_t, t):
        outputs = batched_model_fn(jnp.concatenate([x_t] * num_branches, axis=0), t)
        return combine(*jnp.split(outputs, num_branches, axis=0))

    return model_fn
