"""Finding a pretrained model directory and reading the PyTorch weights in it (diffusers and transformers
share the layout: a config.json beside safetensors, sharded safetensors with an index, or a pickled .bin), and
reading one torch.save'd state-dict file (the original methods' training checkpoints: read_torch_state_dict)."""

from __future__ import annotations

import json
import os
from pickle import UnpicklingError
from typing import Dict, Mapping, Optional

import numpy as np

from pgpis_jax.errors import UserError

CONFIG_NAME = "config.json"


def resolve_model_dir(path_or_repo_id: str, subfolder: Optional[str] = None) -> str:
    """A local directory holding config.json for `path_or_repo_id` (/subfolder): the directory itself, or a
    hub snapshot (which needs network access)."""
    if os.path.isdir(path_or_repo_id):
        directory = path_or_repo_id
    else:
        try:
            from huggingface_hub import snapshot_download

            directory = snapshot_download(path_or_repo_id, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
        except Exception as error:
            raise FileNotFoundError(
                f"{path_or_repo_id!r} is not a local directory and could not be fetched from the hub "
                f"({type(error).__name__}: {error}); download it and pass its path") from None
    if subfolder:
        directory = os.path.join(directory, subfolder)
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected a model directory")
    return directory


def read_config(directory: str) -> dict:
    """The parsed config.json of a model directory."""
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_state_dict(directory: str, weights_stem: str, variant: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The state dict (float32 NumPy arrays) in `directory`, from `<stem>.safetensors`, the sharded
    `<stem>.safetensors.index.json`, or the pickled `.bin` (loaded with weights_only), in that order of
    preference. weights_stem: "diffusion_pytorch_model" (diffusers) or "model" / "pytorch_model"
    (transformers: safetensors are "model.*", pickles "pytorch_model.bin"). A file that cannot be read (truncated,
    not a weight file) is a UserError naming it."""
    infix = f".{variant}" if variant else ""
    safetensors_stem = "model" if weights_stem == "pytorch_model" else weights_stem
    single = os.path.join(directory, f"{safetensors_stem}{infix}.safetensors")
    index = os.path.join(directory, f"{safetensors_stem}{infix}.safetensors.index.json")
    pickle = os.path.join(directory, f"{weights_stem}{infix}.bin")
    if os.path.isfile(single):
        state = read_safetensors(single)
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from None
        state = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(directory, shard)))
    elif os.path.isfile(pickle):
        state = read_torch_state_dict(pickle)
    else:
        names = ", ".join(os.path.basename(p) for p in (single, index, pickle))
        raise FileNotFoundError(f"{directory}: no weights; expected {names}")
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """The arrays of a safetensors file; UserError naming the file if it is missing, truncated or not one."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected a safetensors file") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise UserError(f"{path}: not a readable safetensors file, perhaps truncated or still being copied "
                        f"({type(error).__name__}: {error})") from None


def _unpickling_reason(error: Exception) -> str:
    """The informative line of torch's weights-only refusal (e.g. "Unsupported global: GLOBAL x.Y")."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_torch_state_dict(path: str, entry: Optional[str] = None, weights_only: bool = True) -> Dict[str, np.ndarray]:
    """The state dict pickled in a torch file (torch.save): the file's dict itself (entry None, e.g. the
    pytorch_model.bin files of accelerate's save_state) or the dict under `entry` (e.g. "module" in a DeepSpeed
    model-states file), as NumPy arrays: floating-point tensors as float32 (fp16 / bf16 upcast), others (integer
    buffers) in their dtype. Any problem is one UserError naming the file.

    weights_only=True (the default) unpickles only tensors and plain containers, so reading a file runs no code
    from it; pass False only for a file you trust that torch refuses otherwise.
    """
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; expected a torch state-dict file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=weights_only)
    except UnpicklingError as error:
        raise UserError(f"{path}: torch.load(weights_only={weights_only}) could not read it "
                        f"({_unpickling_reason(error)}): it is not a torch checkpoint, or it pickles objects other "
                        "than tensors (then, if you trust the file, read it with weights_only=False)") from None
    except (RuntimeError, EOFError) as error:
        raise UserError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    if entry is not None:
        if not isinstance(content, Mapping) or entry not in content:
            found = ", ".join(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
            raise UserError(f"{path}: expected a dict with the state dict under {entry!r}, found {found}")
        content = content[entry]
    if not isinstance(content, Mapping):
        raise UserError(f"{path}: expected a state dict (a dict of tensors), found a {type(content).__name__}")
    state_dict = {}
    for key, value in content.items():
        if not torch.is_tensor(value):
            where = f"{entry} entry" if entry is not None else "entry"
            raise UserError(f"{path}: {where} {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        state_dict[key] = (value.to(torch.float32) if value.is_floating_point() else value).numpy()
    return state_dict
