"""The original FPDM checkpoints (PyTorch Lightning `last.ckpt` of each stage) in and out: pure converters
between their state dicts and our parameter trees, both ways, and a reader for the .ckpt files.

Stage 1 (`FusionModel`):                              -> {"img_encoder", "combiner"}
  img_encoder.*   CLIPVisionModelWithProjection (transformers 4.x names; encoder_checkpoints converts it)
  pose_encoder.*  the same module registered twice: identical keys and values, dropped on reading, written back
  combiner.*      Combiner (pgpis_jax.models.fpdm), by rule
Stage 2 (`FPDM`):                                     -> {"unet", "srcimage_proj_model", "pose_t_proj"}, and
                                                         optionally {"vae", "src_image_encoder", "fusion_model"}
  unet.*                            SD 2.1 UNet with class_embed_type "mlp" (class_embedding.net.{0,3}), by rule
  sd_model.unet.*                   the same module again (dropped on reading when identical, written back)
  sd_model.srcimage_proj_model.*    the source-token projector, by rule
  sd_model.pose_t_proj.*            the pose encoder, by rule
  vae.*                             frozen SD 2.1 VAE, by rule
  src_image_encoder.*               frozen DINOv2-L (transformers 4.x names)
  fusion_model.*                    the frozen stage-1 model, in the stage-1 layout above
The frozen subtrees are converted when the caller's expected tree holds them and skipped otherwise; any key
outside these prefixes is an error. Every conversion is checked strictly against the expected tree (from
jax.eval_shape): missing, unexpected and mis-shaped keys are one UserError naming the file.

Reading: a Lightning checkpoint is a torch pickle {"state_dict", "epoch", "global_step", "optimizer_states",
"lr_schedulers", "callbacks", "loops", "hparams_name", "hyper_parameters", "hparams_type", ...}. FPDM builds its
models from an OmegaConf DictConfig, which Lightning stores as is in "hyper_parameters" (with the class itself in
"hparams_type"), so torch.load(weights_only=True) refuses the real files ("Unsupported global:
omegaconf.dictconfig.DictConfig"), and weights_only=False would need omegaconf and would run code from the file.
`read_lightning_state_dict` therefore tries weights_only=True first and otherwise unpickles with an allowlist:
torch's tensor rebuilding and OrderedDict are real, every other global becomes an inert placeholder (nothing
from the file is imported or called), which is enough to take the tensors of "state_dict".
"""

from __future__ import annotations

import os
import pickle
import types
from typing import Any, Dict, Mapping

import numpy as np
from absl import logging

from pgpis_jax.errors import UserError
from pgpis_jax.weights.diffusers_io import LIST_NAMES as DIFFUSERS_LIST_NAMES
from pgpis_jax.weights.diffusers_io import rename_deprecated_attention
from pgpis_jax.weights.encoder_checkpoints import clip_vision_params_from_state_dict, dinov2_params_from_state_dict
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

# linen list attributes named "<name>_<i>" where torch says "<name>.<i>": diffusers' (UNet, VAE, the projector's
# and class embedding's `net`), the pose encoder's blocks, CLIP's and DINOv2's layers, the combiner's gate.
LIST_NAMES = tuple(DIFFUSERS_LIST_NAMES) + ("blocks", "layers", "layer", "dynamic_scalar")
FUSION_SUBTREES = ("img_encoder", "combiner")
FUSION_SHARED = ("pose_encoder", "img_encoder")  # (duplicate prefix, the module it repeats)
DIFFUSION_TRAINED = ("unet", "srcimage_proj_model", "pose_t_proj")
DIFFUSION_FROZEN = ("vae", "src_image_encoder", "fusion_model")
# our subtree -> its prefix in the stage-2 state dict
DIFFUSION_PREFIXES = {"unet": "unet", "srcimage_proj_model": "sd_model.srcimage_proj_model",
                      "pose_t_proj": "sd_model.pose_t_proj", "vae": "vae", "src_image_encoder": "src_image_encoder",
                      "fusion_model": "fusion_model"}
DIFFUSION_SHARED = ("sd_model.unet", "unet")
# The globals a Lightning checkpoint's tensors need; any other global is replaced by `_Placeholder`.
_ALLOWED_GLOBALS = frozenset(("collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                              "torch._utils._rebuild_parameter", "torch._tensor._rebuild_from_type_v2",
                              "torch.Tensor", "torch.nn.parameter.Parameter"))


# ------------------------------------------------------------------------------------------------- reading


class _Placeholder:
    """Stands in for an object of a global outside the allowlist: accepts any construction and state, keeps
    nothing, runs nothing."""

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __setstate__(self, state):
        del state

    def __setitem__(self, key, value):
        del key, value

    def append(self, value):
        del value

    def extend(self, values):
        del values


def _allowlist_pickle_module(replaced: set) -> types.ModuleType:
    """A pickle module for torch.load whose Unpickler resolves only `_ALLOWED_GLOBALS` (torch resolves storage
    types itself before asking it) and records the name of every global it replaces in `replaced`."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if f"{module}.{name}" in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            replaced.add(f"{module}.{name}")
            return _Placeholder

    module = types.ModuleType("fpdm_allowlist_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()  # torch's legacy format uses it
    module.UnpicklingError = pickle.UnpicklingError
    return module


def read_lightning_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The "state_dict" of a PyTorch Lightning checkpoint (.ckpt) as float32 NumPy arrays (fp16 upcast),
    read without running code from the file (see the module docstring). UserError naming the file if it is
    missing, unreadable or holds no state dict of tensors."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"FPDM checkpoint {path} does not exist; expected a PyTorch Lightning .ckpt file")
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            replaced: set = set()
            content = torch.load(path, map_location="cpu", weights_only=False,
                                 pickle_module=_allowlist_pickle_module(replaced))
            logging.info("%s: read with placeholders for %s", path, ", ".join(sorted(replaced)))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise UserError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        found = ", ".join(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
        raise UserError(f"{path}: expected a PyTorch Lightning checkpoint (a dict with 'state_dict'), found {found}")
    state_dict = {}
    for key, value in content["state_dict"].items():
        if not torch.is_tensor(value):
            raise UserError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value.detach().to(torch.float32).numpy()
    return state_dict


# ------------------------------------------------------------------------------------------------- helpers


def _split(state_dict: Mapping[str, np.ndarray], prefixes) -> tuple:
    """({prefix: {rest: value}} for the given dotted prefixes (longest first), [keys under none of them])."""
    groups: Dict[str, Dict[str, np.ndarray]] = {prefix: {} for prefix in prefixes}
    unmatched = []
    for key, value in state_dict.items():
        for prefix in sorted(prefixes, key=len, reverse=True):
            if key.startswith(prefix + "."):
                groups[prefix][key[len(prefix) + 1:]] = value
                break
        else:
            unmatched.append(key)
    return groups, sorted(unmatched)


def _listed(label: str, keys) -> str:
    keys = sorted(keys)
    return f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"


def _shared_problems(copy: Mapping[str, np.ndarray], original: Mapping[str, np.ndarray], copy_prefix: str,
                     original_prefix: str) -> list:
    """Why a duplicate prefix (the same torch module registered twice) does not repeat the original exactly;
    empty when it does or when it is absent."""
    if not copy:
        return []
    what = f"{copy_prefix}.* should repeat {original_prefix}.* (one module registered twice) but"
    if set(copy) != set(original):
        return [f"{what} the keys differ: " + _listed("only there", set(copy) - set(original)) + "; "
                + _listed(f"only in {original_prefix}.*", set(original) - set(copy))]
    differing = [key for key in copy if not np.array_equal(copy[key], original[key])]
    return [f"{what} " + _listed("the values differ", differing)] if differing else []


def _strict(params: dict, expected: Mapping[str, Any], source: str, problems: list, what: str) -> dict:
    """params after one strict check against expected; UserError naming source with every problem."""
    try:
        check_params_match(params, expected, "its state dict")
    except ValueError as error:
        problems.insert(0, str(error))
    if problems:
        raise UserError(f"{source}: not a matching FPDM {what} state dict: " + "; ".join(problems))
    return params


def _state_dict(params: Mapping) -> Dict[str, np.ndarray]:
    # np.array copies: torch wants writable arrays, and jax arrays convert to read-only ones
    return {key: np.array(value, np.float32) for key, value in params_to_state_dict(params, LIST_NAMES).items()}


def _check_subtrees(params: Mapping, required, optional, what: str):
    names = set(params)
    if not set(required) <= names or not names <= set(required) | set(optional):
        raise UserError(f"FPDM {what} params must have the subtrees {', '.join(required)}"
                        + (f" (and optionally {', '.join(optional)})" if optional else "")
                        + f"; got {', '.join(map(str, params))}")


def _with_prefix(prefix: str, state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {f"{prefix}.{key}": value for key, value in state_dict.items()}


# ------------------------------------------------------------------------------------------------- stage 1


def _fusion_tree(state_dict: Mapping[str, np.ndarray], problems: list, prefix: str = "") -> dict:
    """{"img_encoder", "combiner"} of a FusionModel state dict (unchecked); the key problems go to `problems`,
    naming keys with `prefix`. ValueError if two entries map to one parameter."""
    groups, unmatched = _split(state_dict, FUSION_SUBTREES + FUSION_SHARED[:1])
    if unmatched:
        problems.append(_listed(f"unexpected keys outside {prefix}img_encoder.*, {prefix}pose_encoder.*, "
                                f"{prefix}combiner.*", [prefix + key for key in unmatched]))
    copy, original = (prefix + name for name in FUSION_SHARED)
    problems += _shared_problems(groups[FUSION_SHARED[0]], groups[FUSION_SHARED[1]], copy, original)
    return {"img_encoder": clip_vision_params_from_state_dict(groups["img_encoder"], {}, with_projection=True),
            "combiner": state_dict_to_params(groups["combiner"])}


def fusion_params_from_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                                  source: str) -> dict:
    """Stage 1's {"img_encoder": CLIP params, "combiner": Combiner params} from the FusionModel state dict
    (img_encoder.*, its duplicate pose_encoder.*, combiner.*; NumPy arrays). expected: the abstract tree with
    those two subtrees; source names the file in the UserError listing every mismatch."""
    _check_subtrees(expected, FUSION_SUBTREES, (), "stage-1 expected")
    problems: list = []
    try:
        params = _fusion_tree(state_dict, problems)
    except ValueError as error:
        params = {}
        problems.append(str(error))
    return _strict(params, expected, source, problems, "stage-1")


def fusion_state_dict_from_params(params: Mapping) -> Dict[str, np.ndarray]:
    """The FusionModel state dict (float32 NumPy) of {"img_encoder", "combiner"}, pose_encoder.* repeating
    img_encoder.* as the original's shared module does."""
    _check_subtrees(params, FUSION_SUBTREES, (), "stage-1")
    encoder = _state_dict(params["img_encoder"])
    return {**_with_prefix("img_encoder", encoder), **_with_prefix("pose_encoder", encoder),
            **_with_prefix("combiner", _state_dict(params["combiner"]))}


# ------------------------------------------------------------------------------------------------- stage 2

_DIFFUSION_CONVERTERS = {
    "unet": state_dict_to_params,
    "srcimage_proj_model": state_dict_to_params,
    "pose_t_proj": state_dict_to_params,
    "vae": lambda group: state_dict_to_params(rename_deprecated_attention(group)),
    "src_image_encoder": dinov2_params_from_state_dict,
}


def diffusion_params_from_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                                     source: str) -> dict:
    """Stage 2's params from the FPDM LightningModule state dict (NumPy arrays): {"unet",
    "srcimage_proj_model", "pose_t_proj"} always, and each of "vae", "src_image_encoder", "fusion_model"
    ({"img_encoder", "combiner"}) that `expected` (the abstract tree) holds; the others' keys are skipped.
    source names the file in the UserError listing every mismatch."""
    _check_subtrees(expected, DIFFUSION_TRAINED, DIFFUSION_FROZEN, "stage-2 expected")
    groups, unmatched = _split(state_dict, tuple(DIFFUSION_PREFIXES.values()) + DIFFUSION_SHARED[:1])
    problems = [_listed("unexpected keys outside the FPDM prefixes", unmatched)] if unmatched else []
    problems += _shared_problems(groups[DIFFUSION_SHARED[0]], groups[DIFFUSION_SHARED[1]], *DIFFUSION_SHARED)
    skipped = [name for name in DIFFUSION_FROZEN if name not in expected and groups[DIFFUSION_PREFIXES[name]]]
    if skipped:
        logging.info("%s: not reading the frozen %s", source, ", ".join(skipped))
    params = {}
    for name in expected:
        prefix = DIFFUSION_PREFIXES[name]
        try:
            params[name] = _fusion_tree(groups[prefix], problems, prefix + ".") if name == "fusion_model" \
                else _DIFFUSION_CONVERTERS[name](groups[prefix])
        except ValueError as error:
            problems.append(f"{prefix}.*: {error}")
    return _strict(params, expected, source, problems, "stage-2")


def diffusion_state_dict_from_params(params: Mapping) -> Dict[str, np.ndarray]:
    """The FPDM LightningModule state dict (float32 NumPy) of our stage-2 params (the trained subtrees and any of
    the frozen ones), with the original's prefixes and its duplicates (sd_model.unet.*, and
    fusion_model.pose_encoder.*)."""
    _check_subtrees(params, DIFFUSION_TRAINED, DIFFUSION_FROZEN, "stage-2")
    state_dict = {}
    for name, prefix in DIFFUSION_PREFIXES.items():
        if name == "fusion_model" and name in params:
            state_dict.update(_with_prefix(prefix, fusion_state_dict_from_params(params[name])))
        elif name in params:
            state_dict.update(_with_prefix(prefix, _state_dict(params[name])))
    state_dict.update(_with_prefix(DIFFUSION_SHARED[0], _state_dict(params["unet"])))
    return state_dict


# --------------------------------------------------------------------------------------------------- files


def load_fusion_checkpoint(path: str, expected: Mapping[str, Any]) -> dict:
    """Stage 1's params from the original's FusionModel `last.ckpt` (see fusion_params_from_state_dict)."""
    return fusion_params_from_state_dict(read_lightning_state_dict(path), expected, path)


def load_diffusion_checkpoint(path: str, expected: Mapping[str, Any]) -> dict:
    """Stage 2's params from the original's FPDM `last.ckpt` (see diffusion_params_from_state_dict)."""
    return diffusion_params_from_state_dict(read_lightning_state_dict(path), expected, path)
