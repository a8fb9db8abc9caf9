"""PIDM's checkpoints (its train.py's `last.pt`, the released DeepFashion model) in and out.

A PIDM file is torch.save({"model": state_dict, "ema": state_dict, "scheduler": ..., "optimizer": ...,
"conf": the tensorfn training config}); its predict.py and test script read "ema". The state dict is that
of `BeatGANsAutoencModel`: the UNet's keys bare ("time_embed.time_embed.0.weight", "input_blocks.11.1.to_q.weight",
...) and the texture encoder's under "encoder.". They convert by rule (pgpis_jax.weights.pytorch) to
{"unet": PIDMUNet params, "encoder": PIDMTextureEncoder params}, with two particulars:
  - the attention projections are 1x1 Conv1d, weight [O, I, 1]: read as Dense kernels [I, O];
  - the keys of `UNUSED_KEYS` (parameters PIDM creates but its forward never reads) are dropped.
Everything else must match the abstract trees the caller builds with jax.eval_shape; otherwise one UserError
names the file and lists the missing, unexpected and mis-shaped keys.

Reading uses torch.load(weights_only=True). The pickled config needs PIDM's and tensorfn's classes, which we
neither import nor run: every global that torch would refuse (torch.serialization.get_unsafe_globals_in_
checkpoint) is allowed as an inert placeholder, so the config loads as placeholders and is ignored.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from typing import Any, Dict, Mapping, Optional

import numpy as np
from absl import logging

from pgpis_jax.errors import UserError
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

ENCODER_PREFIX = "encoder."
SUBTREES = ("unet", "encoder")
# torch list attributes: "<name>.<i>" in torch, "<name>_<i>" in linen.
LIST_NAMES = ("input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers", "out_layers", "time_embed",
              "out")
# The attention blocks' 1x1 Conv1d projections (weight [O, I, 1]), Dense layers in linen.
CONV1D_LAYERS = ("to_q", "to_kv", "proj_out2")
_PARAM = r"\.(?:weight|bias)"
# Released parameters PIDM never uses (full-match patterns) and why; they are dropped when reading.
UNUSED_KEYS = (
    (r"(?:(?:encoder\.)?input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.[0-2])\.cond_emb_layers\.1"
     + _PARAM, "ResBlock style modulation: TimestepEmbedSequential passes cond=None to every ResBlock"),
    (r"(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.(?:qkv|proj_out1)" + _PARAM,
     "AttentionBlock self-attention: commented out in PIDM, only the cross-attention (to_q, to_kv, proj_out2) runs"),
    (r"encoder\.time_embed\.[02]" + _PARAM,
     "texture encoder time embedding: BeatGANsEncoder.forward never computes it"),
    (r"encoder\.input_blocks\.\d+\.0\.emb_layers\.1" + _PARAM,
     "texture encoder time modulation: the encoder calls its ResBlocks with emb=None"),
)


def unused_key_reason(key: str) -> Optional[str]:
    """Why PIDM never uses the state-dict entry `key`, or None if it is used."""
    for pattern, reason in UNUSED_KEYS:
        if re.fullmatch(pattern, key):
            return reason
    return None


class _Placeholder:
    """Stands in for any object of a checkpoint that is not made of tensors: constructed and given its state
    without running code from the file's classes."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load(path: str):
    import torch

    archive = zipfile.is_zipfile(path)  # torch's format since 1.6; memory-mapped, so unread entries cost nothing
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if archive else []
        with torch.serialization.safe_globals([(_Placeholder, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    except FileNotFoundError:
        raise UserError(f"PIDM checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a readable torch checkpoint ({reason})") from None


def read_pidm_state_dict(path: str, entry: str = "ema") -> Dict[str, np.ndarray]:
    """The state dict under `entry` ("ema" or "model") of a PIDM checkpoint file, or the file's content if it
    is a bare state dict, as float32 NumPy arrays (fp16 upcast)."""
    import torch

    content = _load(path)
    if not isinstance(content, Mapping):
        raise UserError(f"{path}: expected a dict (PIDM's checkpoint or a state dict), found {type(content).__name__}")
    if entry in content and isinstance(content[entry], Mapping):
        content = content[entry]
    elif not content or not all(torch.is_tensor(v) for v in content.values()):
        raise UserError(f"{path}: expected PIDM's checkpoint with a state dict under {entry!r} (or a bare state dict), "
                        f"found the entries {', '.join(map(str, content))}")
    state_dict = {}
    for key, value in content.items():
        if not torch.is_tensor(value):
            raise UserError(f"{path}: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = np.array(value.detach().to(torch.float32).numpy())
    return state_dict


def _layer(key: str) -> str:
    """The layer name of a state-dict key ("input_blocks.11.1.to_q.weight" -> "to_q")."""
    return key.split(".")[-2] if "." in key else ""


def pidm_state_dict_to_params(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                              source: str = "the PIDM state dict") -> Dict[str, dict]:
    """{"unet": ..., "encoder": ...} params from PIDM's state dict (torch keys, NumPy arrays), checked strictly
    against `expected` (the same layout of abstract trees, jax.eval_shape of the modules' init_params) after
    dropping `UNUSED_KEYS`. Raises one UserError naming `source` otherwise."""
    if set(expected) != set(SUBTREES):
        raise ValueError(f"expected must have exactly the subtrees {SUBTREES}, got {tuple(expected)}")
    groups: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in SUBTREES}
    dropped = 0
    for key, value in state_dict.items():
        if unused_key_reason(key) is not None:
            dropped += 1
            continue
        value = np.asarray(value)
        if _layer(key) in CONV1D_LAYERS and key.endswith(".weight") and value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if key.startswith(ENCODER_PREFIX):
            groups["encoder"][key[len(ENCODER_PREFIX):]] = value
        else:
            groups["unet"][key] = value
    logging.info("%s: dropped %d entries PIDM never uses", source, dropped)
    params, problems = {}, []
    for name in SUBTREES:
        params[name] = state_dict_to_params(groups[name])
        try:
            check_params_match(params[name], expected[name], f"the {name} part")
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise UserError(f"{source}: not a matching PIDM checkpoint: " + "; ".join(problems))
    return params


def load_pidm_checkpoint(path: str, expected: Mapping[str, Any], entry: str = "ema") -> Dict[str, dict]:
    """{"unet": ..., "encoder": ...} params (float32 NumPy) from a PIDM checkpoint file's `entry` state dict;
    see `pidm_state_dict_to_params`."""
    return pidm_state_dict_to_params(read_pidm_state_dict(path, entry), expected, path)


def _unused_entries(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Zero arrays for the `UNUSED_KEYS` entries of PIDM's model with the layers of `state_dict`."""
    embed = state_dict["time_embed.time_embed.2.weight"].shape[0]
    time_channels = state_dict["time_embed.time_embed.0.weight"].shape[1]
    entries = {"encoder.time_embed.0.weight": (embed, time_channels), "encoder.time_embed.0.bias": (embed,),
               "encoder.time_embed.2.weight": (embed, embed), "encoder.time_embed.2.bias": (embed,)}
    for key, value in state_dict.items():
        if key.endswith(".out_layers.3.weight"):
            block, out = key[:-len("out_layers.3.weight")], value.shape[0]
            entries.update({f"{block}cond_emb_layers.1.weight": (out, out), f"{block}cond_emb_layers.1.bias": (out,)})
            if key.startswith(ENCODER_PREFIX):
                entries.update({f"{block}emb_layers.1.weight": (2 * out, embed),
                                f"{block}emb_layers.1.bias": (2 * out,)})
        elif key.endswith(".to_kv.weight"):
            block, channels = key[:-len("to_kv.weight")], value.shape[1]
            entries.update({f"{block}qkv.weight": (3 * channels, channels, 1), f"{block}qkv.bias": (3 * channels,),
                            f"{block}proj_out1.weight": (channels, channels, 1), f"{block}proj_out1.bias": (channels,)})
    return {key: np.zeros(shape, np.float32) for key, shape in entries.items()}


def pidm_params_to_state_dict(params: Mapping[str, Any], include_unused: bool = True) -> Dict[str, np.ndarray]:
    """PIDM's state dict (float32 NumPy) of {"unet": ..., "encoder": ...} params; the inverse of
    `pidm_state_dict_to_params`. include_unused adds the `UNUSED_KEYS` entries as zeros (they never affect
    the output), so that PIDM's BeatGANsAutoencModel loads the result with strict=True."""
    if set(params) != set(SUBTREES):
        raise ValueError(f"PIDM params must have exactly the subtrees {SUBTREES}, got {tuple(params)}")
    state_dict = {}
    for name in SUBTREES:
        prefix = ENCODER_PREFIX if name == "encoder" else ""
        for key, value in params_to_state_dict(params[name], LIST_NAMES).items():
            value = np.array(value, np.float32)
            if _layer(key) in CONV1D_LAYERS and key.endswith(".weight"):
                value = value[..., None]
            state_dict[prefix + key] = value
    if include_unused:
        state_dict.update(_unused_entries(state_dict))
    return state_dict
