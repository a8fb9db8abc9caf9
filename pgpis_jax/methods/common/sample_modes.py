"""sample.py's two modes, checked from its flags before anything is loaded or written: split mode (`--split` with
`--output_dir`: every pair of a split) and single mode (a photo, poses and `--output`: one image)."""

from __future__ import annotations

import os
from typing import Dict, Optional

from pgpis_jax.errors import UserError


def is_split_mode(split: Optional[str], output_dir: Optional[str], single: Dict[str, Optional[str]]) -> bool:
    """True for split mode, False for single mode; UserError naming the flags when they mix or miss the modes.

    `single`: {flag name without dashes: value} of the single-mode flags, `output` last (e.g. {"source_image": ..,
    "target_pose": .., "output": ..}); its `output` must not exist (outputs are never overwritten)."""
    flags = ", ".join(f"--{name}" for name in single)
    given = [value for value in single.values() if value]
    if split is None and not given:
        raise UserError(f"give --split and --output_dir (every pair of a split) or {flags} (one image)")
    if split is not None and given:
        raise UserError(f"--split cannot be combined with {' / '.join('--' + name for name in single)}")
    if split is not None:
        if not output_dir:
            raise UserError("--split needs --output_dir")
        return True
    if len(given) < len(single):
        raise UserError(f"single mode needs {flags}")
    if os.path.exists(single["output"]):
        raise UserError(f"--output={single['output']} exists; choose a new file (outputs are never overwritten)")
    return False
