"""Finding and loading the PyTorch weight files of the metric networks (Inception-v3, LPIPS backbones).

The files are the ones torchvision, pytorch-fid and lpips download; nothing is fetched here. A file is looked
up by its exact name in the folder given by `--weights_dir` (the `weights_dir` argument), else in the folder
named by the environment variable PGPIS_METRIC_WEIGHTS, else in torch's hub cache (`$TORCH_HOME/hub/
checkpoints`, where torchvision and pytorch-fid keep their downloads).
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import jax
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params

WEIGHTS_DIR_ENV = "PGPIS_METRIC_WEIGHTS"
WEIGHTS_DIR_FLAG = "--weights_dir"

# File name -> where to download it.
KNOWN_WEIGHT_FILES = {
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "inception_v3_google-0cc3c7bd.pth": "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",
    # LPIPS v0.1 linear heads (also inside the lpips wheel: lpips/weights/v0.1/).
    "alex.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
    "vgg.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
}


def _search_dirs(weights_dir: Optional[str]) -> list:
    if weights_dir is not None:
        if not os.path.isdir(weights_dir):
            raise UserError(f"{WEIGHTS_DIR_FLAG} {weights_dir!r} is not a directory")
        return [weights_dir]
    dirs = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(os.environ[WEIGHTS_DIR_ENV])
    import torch

    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    return dirs


def find_weight_file(filename: str, weights_dir: Optional[str] = None) -> str:
    """The path of the known weight file `filename`: in `weights_dir` if given (only there), else in
    $PGPIS_METRIC_WEIGHTS, else in torch's hub cache. Raises UserError naming the file, where it was looked
    for, its download URL and how to point at the folder holding it."""
    if filename not in KNOWN_WEIGHT_FILES:
        raise ValueError(f"unknown metric weight file {filename!r}; known: {', '.join(KNOWN_WEIGHT_FILES)}")
    dirs = _search_dirs(weights_dir)
    for directory in dirs:
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"metric weight file {filename} not found (looked in {', '.join(dirs)}); download it from "
        f"{KNOWN_WEIGHT_FILES[filename]} into a folder and pass that folder with {WEIGHTS_DIR_FLAG} or the "
        f"environment variable {WEIGHTS_DIR_ENV}")


def _read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict as NumPy arrays (floating ones as float32)."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"weight file {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"weight file {path} cannot be read by torch.load ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"weight file {path} holds a {type(checkpoint).__name__}, not a state dict")
    state = {}
    for key, value in checkpoint.items():
        if not torch.is_tensor(value):
            raise UserError(f"weight file {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        state[key] = (value.float() if value.is_floating_point() else value).numpy()
    return state


def load_torch_weights(path: str, expected_abstract_params: Mapping, description: str,
                       ignored_keys: Iterable[str] = (),
                       identifying_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> dict:
    """Our parameter tree (NumPy, dtypes of `expected_abstract_params`) from the PyTorch state dict in `path`.

    expected_abstract_params: the module's parameter tree from `jax.eval_shape` (torch names by the rules of
    pgpis_jax.weights.pytorch). ignored_keys: regular expressions (full match) of state-dict keys that are
    known extras and dropped (classifier heads, num_batches_tracked). identifying_shapes: keys the file must
    hold with exactly these torch shapes, not loaded (e.g. {"fc.weight": (1008, 2048)} tells the FID network
    from the ImageNet one). Every other key must match the expected tree exactly: a missing, unexpected or
    mis-shaped key is a UserError naming `description`, the file and the keys.
    """
    state = _read_state_dict(path)
    source = f"{description} ({path})"
    for key, shape in (identifying_shapes or {}).items():
        if key not in state or tuple(state[key].shape) != tuple(shape):
            found = "absent" if key not in state else f"of shape {tuple(state[key].shape)}"
            raise UserError(f"{source}: entry {key!r} is {found}, expected shape {tuple(shape)}; "
                            f"this is not the file for {description}")
    ignored = [re.compile(pattern) for pattern in ignored_keys]
    kept = {key: value for key, value in state.items()
            if key not in (identifying_shapes or {}) and not any(p.fullmatch(key) for p in ignored)}
    try:
        params = state_dict_to_params(kept)
        check_params_match(params, expected_abstract_params, source)
    except ValueError as error:
        raise UserError(str(error)) from None
    return jax.tree.map(lambda value, want: np.asarray(value, want.dtype), params, expected_abstract_params)
