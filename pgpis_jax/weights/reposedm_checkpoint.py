"""RePoseDM's alignment modules (pgpis_jax/models/reposedm.RecurrentPoseAlignment) as a PyTorch state dict and
back. RePoseDM has no released code, so the names are ours, documented here; they follow RHWF where the module
comes from RHWF (whose convolutions before an instance norm have a bias that never gets a gradient; ours have
none), and convert by rule (pgpis_jax.weights.pytorch): every convolution is an nn.Conv2d (the
attention projections 1x1 without bias, weight [O, I, 1, 1]), LayerNorm / GroupNorm weights are `weight`.

  source_encoder.conv1.weight                             3x3, image -> stem (then InstanceNorm2d, no affine)
  source_encoder.layer{i}.{0,1}.{conv1,conv2,downsample.0}.weight   residual blocks (stride 2 in block 0)
  source_encoder.conv_out.{weight,bias}                   1x1 -> D
  pose_encoder.*                                          the same on the 20-channel pose map
  mapformer.{slf_attn,crs_attn}.{w_qs,w_ks,w_vs,fc}.weight   1x1, no bias
  mapformer.{slf_attn,crs_attn}.ln.{weight,bias}          LayerNorm over channels, eps 1e-6
  mapformer.pos_ffn.{w_1,w_2}.{weight,bias}, mapformer.pos_ffn.ln.{weight,bias}
  aggregator.layer{1,2}.0.{weight,bias}                   3x3 conv; aggregator.layer{1,2}.1: GroupNorm(D / 8)
  aggregator.flow_head.{weight,bias}                      1x1 -> 2 (dx, dy), grid pixels
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

# torch list attributes: "layer1.0" (a Sequential's member) is "layer1_0" in linen; 9 stages at most.
LIST_NAMES = tuple(f"layer{i}" for i in range(1, 10)) + ("downsample",)


def alignment_params_to_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The PyTorch state dict (float32 NumPy, names in the module docstring) of RecurrentPoseAlignment params."""
    return {key: np.array(value, np.float32) for key, value in params_to_state_dict(params, LIST_NAMES).items()}


def alignment_state_dict_to_params(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                                   source: str = "the alignment state dict") -> Dict[str, Any]:
    """RecurrentPoseAlignment params from its PyTorch state dict, checked strictly against `expected` (jax.eval_shape
    of the module's init_params); one UserError naming `source` otherwise."""
    params = state_dict_to_params({key: np.asarray(value) for key, value in state_dict.items()})
    try:
        check_params_match(params, expected, source)
    except ValueError as error:
        raise UserError(str(error)) from None
    return params
