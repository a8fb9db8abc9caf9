"""Finding a pretrained model directory and reading the PyTorch weights in it (diffusers and transformers
share the layout: a config.json beside safetensors, sharded safetensors with an index, or a pickled .bin)."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

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
    (transformers: safetensors are "model.*", pickles "pytorch_model.bin")."""
    from safetensors.numpy import load_file

    infix = f".{variant}" if variant else ""
    safetensors_stem = "model" if weights_stem == "pytorch_model" else weights_stem
    single = os.path.join(directory, f"{safetensors_stem}{infix}.safetensors")
    index = os.path.join(directory, f"{safetensors_stem}{infix}.safetensors.index.json")
    pickle = os.path.join(directory, f"{weights_stem}{infix}.bin")
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
    elif os.path.isfile(pickle):
        import torch

        state = {k: v.float().numpy() for k, v in torch.load(pickle, map_location="cpu", weights_only=True).items()}
    else:
        names = ", ".join(os.path.basename(p) for p in (single, index, pickle))
        raise FileNotFoundError(f"{directory}: no weights; expected {names}")
    return {k: np.asarray(v, np.float32) for k, v in state.items()}
