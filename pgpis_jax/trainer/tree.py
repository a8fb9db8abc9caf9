"""Parameter trees as the trainer sees them: nested dicts of arrays, addressed by "/"-joined paths.

Sharding rules, trainable/frozen groups and the EMA all select parameters by regexes on these paths
(e.g. "unet/up_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel"), matched against the whole
path (`re.fullmatch`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import jax
from flax import traverse_util

from pgpis_jax.errors import UserError

Path = Tuple[str, ...]


def flatten(params: Mapping) -> Dict[Path, Any]:
    """{("a", "b", "kernel"): leaf}; an error if `params` is not a nested dict of arrays."""
    if not isinstance(params, Mapping):
        raise TypeError(f"parameters must be a nested dict of arrays, got {type(params).__name__}")
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=False)
    for path, leaf in flat.items():
        if isinstance(leaf, (list, tuple)) or leaf is None:
            raise TypeError(f"parameter {path_str(path)!r} is a {type(leaf).__name__}; parameters must be a "
                            "nested dict of arrays")
    return flat


def unflatten(flat: Mapping[Path, Any]) -> Dict:
    return traverse_util.unflatten_dict(dict(flat))


def path_str(path: Sequence[str]) -> str:
    return "/".join(str(p) for p in path)


def leaf_paths(params: Mapping) -> list:
    """The "/"-joined paths of all parameters, sorted."""
    return sorted(path_str(p) for p in flatten(params))


def select(params: Mapping, keep: Callable[[str], bool]) -> Dict:
    """The sub-tree of parameters whose path satisfies `keep` (empty branches dropped)."""
    return unflatten({p: v for p, v in flatten(params).items() if keep(path_str(p))})


def merge(*trees: Mapping) -> Dict:
    """One tree holding the leaves of all `trees` (which must not share a leaf path)."""
    flat = {}
    for tree in trees:
        for path, leaf in flatten(tree).items():
            if path in flat:
                raise ValueError(f"parameter {path_str(path)!r} is in two trees being merged")
            flat[path] = leaf
    return unflatten(flat)


def compile_patterns(patterns: Iterable[str], what: str):
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise UserError(f"{what}: {pattern!r} is not a valid regular expression ({error})") from None
    return compiled


def matches_any(path: str, compiled) -> bool:
    return any(c.fullmatch(path) for c in compiled)


def key_path_parts(key_path) -> Tuple[str, ...]:
    """A jax key path (DictKey / GetAttrKey / SequenceKey entries) as plain strings."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def flatten_with_paths(tree) -> list:
    """[(("opt_state", "0", "mu", "dense", "kernel"), leaf), ...] for any pytree."""
    return [(key_path_parts(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
