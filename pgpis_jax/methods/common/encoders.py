"""Frozen pretrained encoders described as data: which network (a config.model spec and parameter-tree name) reads
which batch key and which of its outputs becomes which feature.

    ENCODED = (EncoderUse("target_embedding", network="image_encoder", input="target_clip", output="image_embeds"),
               EncoderUse("source_tokens", network="dinov2", input="source_dino", output="last_hidden_state"))

`FrozenEncoders` builds each named network once (transformers layout: CLIP vision, DINOv2, Swin), gives its
fresh and warm-start parameters, and computes the features of a batch with gradients stopped. A use whose
`output` names a sequence (e.g. Swin's "hidden_states") yields that sequence as a tuple.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from pgpis_jax.methods.common.networks import NetworkBuilder, load_pretrained


@dataclasses.dataclass(frozen=True)
class EncoderUse:
    """feature = network(batch[input])[output], optionally cast to `dtype` (e.g. "float32")."""

    feature: str
    network: str
    input: str
    output: str
    dtype: str = ""


class FrozenEncoders:
    """The networks of `uses`, resolved from config.model.<network> (one module per network)."""

    def __init__(self, config, uses: Sequence[EncoderUse], builder: NetworkBuilder, policy):
        self.uses: Tuple[EncoderUse, ...] = tuple(uses)
        names = sorted({use.network for use in self.uses})
        kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype,
                  attention_implementation=config.model.attention_implementation)
        self.resolved = {name: builder.network(config.model[name], f"config.model.{name}", "transformers", **kw)
                         for name in names}

    @property
    def networks(self) -> Tuple[str, ...]:
        return tuple(sorted(self.resolved))

    def module(self, name: str):
        return self.resolved[name].module

    def init(self, rng) -> Dict[str, Any]:
        return {name: r.module.init_params(jax.random.fold_in(rng, i))
                for i, (name, r) in enumerate(sorted(self.resolved.items()))}

    def warm_start(self, params) -> Dict[str, Any]:
        return {name: load_pretrained(r, params[name]) for name, r in self.resolved.items()}

    def use(self, feature: str) -> EncoderUse:
        return next(u for u in self.uses if u.feature == feature)

    def encode(self, params, feature: str, pixels):
        """The feature named `feature` of preprocessed pixels [B, H, W, 3] (gradients stopped)."""
        use = self.use(feature)
        out = self.module(use.network).apply({"params": params[use.network]}, pixels)[use.output]
        if use.dtype:
            out = jax.tree.map(lambda x: x.astype(jnp.dtype(use.dtype)), out)
        return jax.lax.stop_gradient(tuple(out) if isinstance(out, (list, tuple)) else out)

    def features(self, params, batch) -> Dict[str, Any]:
        """{feature: value} of every use whose input key is in `batch`."""
        return {use.feature: self.encode(params, use.feature, batch[use.input])
                for use in self.uses if use.input in batch}
