"""FPDM's stage-1 objective ("source-enhanced pose fusion"), as the original's
`FusionModel.combiner_fusion_info_nce_loss` computes it; the validation loss and metrics are the same function
on the test pairs (the original monitors `val_loss`).

With s, t the CLIP image_embeds of source and target and f the Combiner's fusion embedding ([N, D] each; s and
t not normalised, f of unit norm), and source_enhanced (config conbiner_self_learning, true):
  T = [t; s], F = [f; s], S = [s; s]                    (2N rows: the sources become extra positives)
  cos[i, j] = <T_i / max(|T_i|, 1e-8), F_j / max(|F_j|, 1e-8)>   (F.cosine_similarity)
  logits = cos / temperature                             (0.07)
  nll_i = logsumexp_j logits[i, j] - logits[i, i]        (one direction: rows are targets)
  l1 = mean |S - F|                                      (over all 2N x D entries; the second half is 0)
  loss = mean_i nll_i + l1_weight * l1                   (l1_weight 1e-4)
Ranking metrics (logged only): the position of the positive among its row, rank_i = #{j != i : logits[i, j] >
logits[i, i]}; top1 = mean(rank == 0), top5 = mean(rank < 5), mean_position = 1 + mean(rank). The original
sorts with torch's argsort, which orders exact ties arbitrarily (they occur when a batch holds the same source
image twice: both source rows then score 1 against it); here a tie never ranks ahead of the positive.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

FUSION_TEMPERATURE = 0.07
FUSION_L1_WEIGHT = 1e-4
COSINE_EPS = 1e-8


def _unit_rows(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), COSINE_EPS)


def fusion_contrastive_loss(source, target, fusion, temperature: float = FUSION_TEMPERATURE,
                            l1_weight: float = FUSION_L1_WEIGHT,
                            source_enhanced: bool = True) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(loss, metrics) of a batch: source, target, fusion [N, D] (any float dtype; computed in float32).

    metrics: "loss" (the same scalar), "l1" (mean |S - F|, before weighting), "top1", "top5",
    "mean_position" (see the module docstring), all float32 scalars.
    """
    for name, value in (("source", source), ("target", target), ("fusion", fusion)):
        if value.ndim != 2 or value.shape != source.shape:
            raise ValueError(f"fusion_contrastive_loss: {name} must be [N, D] like source {source.shape}, "
                             f"got shape {value.shape}")
    source, target, fusion = (jnp.asarray(x, jnp.float32) for x in (source, target, fusion))
    if source_enhanced:
        target = jnp.concatenate([target, source], axis=0)
        fusion = jnp.concatenate([fusion, source], axis=0)
        source = jnp.concatenate([source, source], axis=0)
    logits = _unit_rows(target) @ _unit_rows(fusion).T / temperature
    positive = jnp.diagonal(logits)
    nll = jax.nn.logsumexp(logits, axis=-1) - positive
    l1 = jnp.mean(jnp.abs(source - fusion))
    loss = jnp.mean(nll) + l1_weight * l1
    rank = jnp.sum(logits > positive[:, None], axis=-1)  # the positive itself is never greater
    metrics = {"loss": loss, "l1": l1, "top1": jnp.mean(rank == 0, dtype=jnp.float32),
               "top5": jnp.mean(rank < 5, dtype=jnp.float32), "mean_position": 1 + jnp.mean(rank, dtype=jnp.float32)}
    return loss, metrics
