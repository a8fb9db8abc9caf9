"""The absl entry points and configs as a user meets them: clear one-line errors, configs that load,
the resolved config written to the workdir."""

import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from pgpis_jax import cli
from pgpis_jax.diffusion import from_diffusers_config
from pgpis_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if "def get_config(" in open(p).read())


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if "error" in line]


def test_unknown_override_key_is_one_line_naming_the_key(tmp_path):
    result = _run("train.py", "--config=configs/pcdm_inpaint.py", f"--workdir={tmp_path}",
                  "--config.optimizer.no_such_key=1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert _error_lines(result) == [
        "train.py: error: unknown config key 'config.optimizer.no_such_key'; keys of config.optimizer: "
        "b1, b2, eps, learning_rate, name, schedule, weight_decay"]


def test_unknown_method_is_one_line_and_writes_nothing(tmp_path):
    result = _run("train.py", "--config=configs/pcdm_inpaint.py:demo", f"--workdir={tmp_path}",
                  "--config.method=no_such_method")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = _error_lines(result)
    assert line.startswith("train.py: error: unknown method 'no_such_method' in config.method; known methods: ")
    assert os.listdir(tmp_path) == []


def test_pcdm_without_weights_or_data_is_one_message_pointing_at_both_and_demo(tmp_path):
    env_data = tmp_path / "no_tfds"
    result = _run("train.py", "--config=configs/pcdm_inpaint.py", f"--workdir={tmp_path / 'run'}",
                  f"--config.data.data_dir={env_data}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1, result.stderr
    message = lines[0]
    for expected in ("config.model.unet.weights='stabilityai/stable-diffusion-2-1-base'",
                     "config.model.vae.weights", "config.model.image_encoder.weights='h94/IP-Adapter'",
                     "config.model.dinov2.weights='facebook/dinov2-giant'", "config.data.dataset='deepfashion'",
                     "tfds build", ":demo"):
        assert expected in message, expected
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_demo_writes_resolved_config_and_reports_each_sampler(tmp_path):
    result = _run("demo.py", "--config=configs/toy_mixture.py:quick", f"--workdir={tmp_path}",
                  "--config.num_samples=300")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["num_samples"] == 300
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert set(metrics) == {"prior"} | set(written["samplers"])
    for name in written["samplers"]:
        assert os.path.exists(tmp_path / f"{name}.png")
        assert metrics[name]["std_ratio"] < 0.5 * metrics["prior"]["std_ratio"]


def test_unknown_override_names_missing_group_and_leaf():
    config = ml_collections.ConfigDict({"a": {"b": 1}, "c": 2})
    assert cli.unknown_override(config, ["--config.a.b=3", "--config.c=1"]) is None
    assert cli.unknown_override(config, ["--config.a.x=3"]) == "unknown config key 'config.a.x'; keys of config.a: b"
    assert "config.c is not a group" in cli.unknown_override(config, ["--config.c.d=1"])


def test_workdir_config_is_written_once_and_a_different_one_is_refused(tmp_path):
    config = ml_collections.ConfigDict({"method": "m", "optimizer": {"learning_rate": 1e-4},
                                        "distributed": {"process_id": 0}})
    path = cli.write_config_json(config, str(tmp_path))
    with open(path) as f:
        assert json.load(f) == {"method": "m", "optimizer": {"learning_rate": 1e-4}, "distributed": {"process_id": 0}}
    assert cli.write_config_json(config, str(tmp_path)) == path
    config.distributed.process_id = 1   # another process of the same multi-host job
    assert cli.write_config_json(config, str(tmp_path)) == path
    assert os.listdir(tmp_path) == ["config.json"]
    config.optimizer.learning_rate = 1e-5
    with pytest.raises(UserError, match="optimizer.learning_rate"):
        cli.write_config_json(config, str(tmp_path))


@pytest.mark.parametrize("config_file", CONFIG_FILES)
@pytest.mark.parametrize("arg", [None, "demo", "market", "res=512"])
def test_configs_load_and_their_schedulers_build(config_file, arg):
    module_globals = {}
    with open(os.path.join(ROOT, config_file)) as f:
        exec(compile(f.read(), config_file, "exec"), module_globals)
    get_config = module_globals["get_config"]
    try:
        config = get_config(arg)
    except ValueError as error:  # an argument this config does not take must be named
        assert arg.split("=")[0] in str(error)
        return
    schedulers = [node.to_dict() for key, node in _walk(config) if key.endswith("scheduler")]
    assert schedulers or "diffusion" not in config, f"{config_file} has no scheduler config"
    for scheduler in schedulers:
        from_diffusers_config(scheduler)


def _walk(node, prefix=""):
    for key, value in node.items():
        yield prefix + key, value
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, f"{prefix}{key}.")
