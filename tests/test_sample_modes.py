"""sample.py's mode check: each mix or gap of flags is one line naming the flags; the two valid modes are told
apart; an existing --output is refused."""

import pytest

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.sample_modes import is_split_mode


def _single(**given):
    return {name: given.get(name) for name in ("source_image", "target_pose", "output")}


def test_valid_modes(tmp_path):
    assert is_split_mode("test", str(tmp_path), _single()) is True
    assert is_split_mode(None, None, _single(source_image="a.png", target_pose="b.txt",
                                             output=str(tmp_path / "new.png"))) is False


@pytest.mark.parametrize("split, output_dir, given, message", [
    (None, None, {}, "give --split and --output_dir (every pair of a split) or --source_image, --target_pose, "
                     "--output (one image)"),
    ("test", "out", {"output": "x.png"}, "--split cannot be combined with --source_image / --target_pose / --output"),
    ("test", None, {}, "--split needs --output_dir"),
    (None, None, {"source_image": "a.png", "output": "x.png"},
     "single mode needs --source_image, --target_pose, --output"),
])
def test_bad_flag_combinations_are_one_line(split, output_dir, given, message):
    with pytest.raises(UserError) as raised:
        is_split_mode(split, output_dir, _single(**given))
    assert str(raised.value) == message


def test_an_existing_output_is_never_overwritten(tmp_path):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"kept")
    with pytest.raises(UserError, match="taken.png exists; choose a new file"):
        is_split_mode(None, None, _single(source_image="a.png", target_pose="b.txt", output=str(existing)))
    assert existing.read_bytes() == b"kept"
