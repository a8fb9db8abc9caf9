"""The original PCDMs checkpoints (DeepSpeed `mp_rank_00_model_states.pt`, or the demo's `PCDMs_ckpt.pt`)
in and out.

Both are pickles holding {"module": state_dict, ...}. The state-dict keys of each stage:
  prior    the bare keys of Stage1_PriorTransformer           -> the PriorTransformer's params tree
  inpaint  unet.*, pose_proj.*, image_proj_model_p.*            -> {"unet", "pose_proj", "image_proj_model_p"}
           (the demo's simplified model says image_proj_model.*, read into "image_proj_model_p")
  refine   unet.*, image_proj_model_p.*                         -> {"unet", "image_proj_model_p"}
Each subtree converts by rule (pgpis_jax.weights.pytorch) and is checked strictly against the abstract
parameter tree the caller builds with jax.eval_shape.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import numpy as np
from absl import logging

from pgpis_jax.errors import UserError
from pgpis_jax.weights.diffusers_io import LIST_NAMES as DIFFUSERS_LIST_NAMES
from pgpis_jax.weights.files import read_torch_state_dict
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
# DeepSpeed's save_checkpoint writes the last tag (the step folder's name) into this file.
DEEPSPEED_LATEST = "latest"
# The top-level subtrees of each stage; each is the torch prefix "<name>." (the prior has none).
STAGE_SUBTREES = {
    "prior": (),
    "inpaint": ("unet", "pose_proj", "image_proj_model_p"),
    "refine": ("unet", "image_proj_model_p"),
}
# The simplified stage-2 model of the PCDMs demo names its projector without the "_p".
SIMPLIFIED_ALIASES = {"inpaint": {"image_proj_model": "image_proj_model_p"}}
# Entries a prior state dict may hold that the model does not use, and why they are dropped. The original's
# own files lack them (Stage1_PriorTransformer keeps the mean / std as plain tensors and the mask as a
# non-persistent buffer); state dicts of diffusers' PriorTransformer (Kandinsky 2.2) have the first two.
IGNORED_PRIOR_KEYS = {
    "clip_mean": "diffusers PriorTransformer's learned CLIP mean (Kandinsky); PCDMs uses CLIP_EMBEDDING_MEAN",
    "clip_std": "diffusers PriorTransformer's learned CLIP std (Kandinsky); PCDMs uses CLIP_EMBEDDING_STD",
    "causal_attention_mask": "the causal text-mask buffer, which PCDMs never applies (no attention mask)",
}
# linen list attributes named "<name>_<i>" where torch says "<name>.<i>" (pose encoder: blocks).
LIST_NAMES = tuple(DIFFUSERS_LIST_NAMES) + ("blocks",)


def _check_stage(stage: str):
    if stage not in STAGE_SUBTREES:
        raise UserError(f"unknown PCDMs stage {stage!r}; expected one of {', '.join(STAGE_SUBTREES)}")


def resolve_checkpoint_file(path: str) -> str:
    """The checkpoint file for `path`: the file itself; or, for a directory, its mp_rank_00_model_states.pt,
    else the one in the step folder named by its DeepSpeed `latest` file, else the one in its only step
    folder. UserError if there is none or the choice is ambiguous."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"PCDMs checkpoint {path} does not exist; expected a {DEEPSPEED_MODEL_STATES} file, "
                        "a .pt file, or a DeepSpeed output directory holding one")
    direct = os.path.join(path, DEEPSPEED_MODEL_STATES)
    if os.path.isfile(direct):
        return direct
    latest = os.path.join(path, DEEPSPEED_LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        tagged = os.path.join(path, tag, DEEPSPEED_MODEL_STATES)
        if not os.path.isfile(tagged):
            raise UserError(f"{latest} names step folder {tag!r}, but {tagged} does not exist")
        return tagged
    steps = sorted(name for name in os.listdir(path)
                   if os.path.isfile(os.path.join(path, name, DEEPSPEED_MODEL_STATES)))
    if len(steps) == 1:
        return os.path.join(path, steps[0], DEEPSPEED_MODEL_STATES)
    if not steps:
        raise UserError(f"{path} holds no {DEEPSPEED_MODEL_STATES}, neither directly nor in a step folder")
    raise UserError(f"{path} holds {DEEPSPEED_MODEL_STATES} in several step folders ({', '.join(steps)}) and no "
                    f"'{DEEPSPEED_LATEST}' file; pass the step folder or the file")


def read_module_state_dict(path: str, weights_only: bool = True) -> Dict[str, np.ndarray]:
    """The "module" state dict of a DeepSpeed / PCDMs .pt file as NumPy arrays, floating point as float32 (fp16
    upcast); see pgpis_jax.weights.files.read_torch_state_dict (weights_only)."""
    return read_torch_state_dict(path, entry="module", weights_only=weights_only)


def _guess_stage(keys) -> str:
    if any(k.startswith("pose_proj.") for k in keys):
        return "inpaint"
    if any(k.startswith("unet.") for k in keys):
        return "refine"
    return "prior"


def _split_by_prefix(state_dict: Mapping[str, np.ndarray], stage: str):
    """({subtree: state dict without the prefix}, [keys with no prefix of the stage])."""
    prefixes = {name: name for name in STAGE_SUBTREES[stage]}
    prefixes.update(SIMPLIFIED_ALIASES.get(stage, {}))
    groups: Dict[str, Dict[str, np.ndarray]] = {}
    unmatched = []
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix in prefixes and rest:
            target = groups.setdefault(prefixes[prefix], {})
            if rest in target:
                raise UserError(f"two entries map to {prefixes[prefix]}.{rest}: the file mixes "
                                f"{prefix}.* with {prefixes[prefix]}.*")
            target[rest] = value
        else:
            unmatched.append(key)
    return groups, sorted(unmatched)


def load_pcdm_checkpoint(path: str, stage: str, expected: Any, weights_only: bool = True) -> dict:
    """The params tree of PCDMs stage `stage` ("prior", "inpaint", "refine") from an original checkpoint.

    path: a DeepSpeed mp_rank_00_model_states.pt, the demo's PCDMs_ckpt.pt, or a directory holding one
    (see `resolve_checkpoint_file`). expected: the abstract params tree (jax.eval_shape) - the prior's tree,
    or {"unet": ..., "pose_proj": ..., "image_proj_model_p": ...} (inpaint), {"unet": ...,
    "image_proj_model_p": ...} (refine). Missing, unexpected and mis-shaped keys are one UserError naming
    the file. Returns the same layout as float32 NumPy arrays (host memory; shard them onto devices).
    """
    _check_stage(stage)
    file = resolve_checkpoint_file(path)
    state_dict = read_module_state_dict(file, weights_only)
    problems = []
    if stage == "prior":
        for key, reason in IGNORED_PRIOR_KEYS.items():
            if state_dict.pop(key, None) is not None:
                logging.info("%s: dropping %r: %s", file, key, reason)
        params = state_dict_to_params(state_dict)
    else:
        groups, unmatched = _split_by_prefix(state_dict, stage)
        params = {name: state_dict_to_params(group) for name, group in groups.items()}
        if unmatched:
            shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
            prefixes = ", ".join(f"{name}." for name in STAGE_SUBTREES[stage])
            problems.append(f"unexpected keys outside the {stage} prefixes ({prefixes}) ({len(unmatched)}): {shown}")
    try:
        check_params_match(params, expected, "its state dict")
    except ValueError as error:
        problems.insert(0, str(error))
    if stage == "inpaint" and "class_embedding" not in params.get("unet", {}) and \
            "class_embedding" in expected.get("unet", {}):
        problems.insert(0, "it has no unet.class_embedding: it is the simplified stage-2 model of PCDMs' notebooks "
                           "(PCDMs_ckpt.pt, DINOv2 tokens only), while the paper's stage 2 that configs/pcdm_inpaint.py "
                           "trains adds the stage-1 embedding through a class embedding, so it cannot be used as one")
    if problems:
        guess = _guess_stage(state_dict)
        hint = f" (its keys look like stage {guess!r})" if guess != stage else ""
        raise UserError(f"{file}: not a matching PCDMs {stage} checkpoint{hint}: " + "; ".join(problems))
    return params


def _float32_state_dict(params: Mapping) -> Dict[str, np.ndarray]:
    # np.array copies: torch wants writable arrays, and jax arrays convert to read-only ones
    return {key: np.array(value, np.float32) for key, value in params_to_state_dict(params, LIST_NAMES).items()}


def save_pcdm_checkpoint(params: Mapping, stage: str, path: str) -> str:
    """Writes `params` of stage `stage` as a .pt file {"module": state_dict} (float32) that the original
    PCDMs code loads (name it mp_rank_00_model_states.pt inside the weights folder its scripts are given).
    Refuses to overwrite `path`; returns it. params must be fully addressable (gathered to this host)."""
    import torch

    _check_stage(stage)
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose a new file name for the PCDMs {stage} checkpoint")
    subtrees = STAGE_SUBTREES[stage]
    if subtrees and set(params) != set(subtrees):
        raise UserError(f"PCDMs {stage} params must have exactly the subtrees {', '.join(subtrees)}; got "
                        f"{', '.join(map(str, params))}")
    if subtrees:
        state_dict = {f"{name}.{key}": value for name in subtrees
                      for key, value in _float32_state_dict(params[name]).items()}
    else:
        state_dict = _float32_state_dict(params)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    torch.save({"module": {key: torch.from_numpy(value) for key, value in state_dict.items()}}, partial)
    os.replace(partial, path)
    return path
