"""What the absl entry points share: the --config/--workdir flags, clear one-line errors for bad input,
and the resolved config written into the workdir (training and demos only: inference never writes into a run).

Configs are Python files with `get_config(arg=None) -> ml_collections.ConfigDict`, chosen with
`--config=configs/x.py[:arg]` and overridden with `--config.a.b=value`; the config is locked, so an
override of a key the config does not have is an error naming that key. sample.py and eval.py make --config
optional: without it they load the run's saved config (pgpis_jax/run_config.py), overrides still apply.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging as pylogging
import os
import sys
import traceback
from typing import Callable, List, Optional, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from pgpis_jax import config_checks, methods
from pgpis_jax.errors import UserError, os_error_message

CONFIG_FLAG = "config"
_CONFIG = config_flags.DEFINE_config_file(CONFIG_FLAG, None, "Config file, e.g. configs/pcdm_inpaint.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, outputs and the resolved config.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print its traceback before the one-line message.")


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of `--name=value` or `--name value` in argv, or None if the flag is not given."""
    for i, item in enumerate(argv):
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
        if item == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file_and_arg(argv: Sequence[str]) -> Optional[tuple]:
    """(path, arg or None) from the --config=... argument, or None if there is none."""
    value = flag_value(argv, CONFIG_FLAG)
    if value is None:
        return None
    path, _, arg = value.partition(":")
    return path, (arg or None)


def _load_config_file(path: str, arg: Optional[str]) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("_pgpis_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def unknown_override(config, overrides: Sequence[str]) -> Optional[str]:
    """The first `--config.a.b=...` override whose key path the config lacks, described for the user."""
    for override in overrides:
        path = override[len(f"--{CONFIG_FLAG}."):].split("=", 1)[0]
        node, walked = config, CONFIG_FLAG
        for part in path.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                known = ", ".join(sorted(node.keys())) if isinstance(node, (ml_collections.ConfigDict, dict)) else ""
                where = f"; keys of {walked}: {known}" if known else f" ({walked} is not a group)"
                return f"unknown config key '{CONFIG_FLAG}.{path}'{where}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def with_saved_config(argv: List[str]) -> List[str]:
    """argv with `--config=<pgpis_jax/run_config.py>:<workdir>` added when it has no --config (inference
    commands: the run's saved config); exits with one line if --workdir is not a trained run."""
    if _config_file_and_arg(argv) is not None:
        return argv
    program = os.path.basename(argv[0])
    workdir = flag_value(argv, "workdir")
    if workdir is None:
        sys.exit(f"{program}: error: --workdir (a trained run directory) is required")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        sys.exit(f"{program}: error: {os.path.join(workdir, 'config.json')} not found: --workdir={workdir} is not a "
                 f"trained run directory (or give --{CONFIG_FLAG})")
    from pgpis_jax import run_config

    # before the overrides: config_flags defines the --config.<key> flags when it parses --config
    return [argv[0], f"--{CONFIG_FLAG}={run_config.__file__}:{workdir}", *argv[1:]]


def parse_flags(argv: List[str]) -> List[str]:
    """absl flag parsing with one-line errors for a missing config file and unknown override keys."""
    program = os.path.basename(argv[0])
    located = _config_file_and_arg(argv)
    if located is None:
        sys.exit(f"{program}: error: --{CONFIG_FLAG}=configs/<name>.py[:arg] is required")
    path, arg = located
    if not os.path.isfile(path):
        sys.exit(f"{program}: error: config file {path!r} does not exist")
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # ml_collections reports unknown keys as AttributeError/KeyError tracebacks
        overrides = [a for a in argv[1:] if a.startswith(f"--{CONFIG_FLAG}.")]
        try:
            message = unknown_override(_load_config_file(path, arg), overrides)
        except Exception as load_error:
            message = f"config file {path!r} failed to load: {load_error}"
        sys.exit(f"{program}: error: {message or error}")


def write_config_json(config: ml_collections.ConfigDict, workdir: str, name: str = "config.json") -> str:
    """Writes the resolved config as JSON to workdir/name (under a temporary name, then renamed) and returns the path.

    An existing file there that differs in other keys than those that may change between runs (e.g. the
    `distributed` settings of each process of a multi-host job) is an error naming the differing keys: a workdir
    belongs to one config.
    """
    from pgpis_jax.trainer.checkpoints import RESUMABLE_KEYS, differing_keys, key_in

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differing = [key for key in differing_keys(previous, resolved) if not key_in(key, RESUMABLE_KEYS)]
        if differing:
            raise UserError(f"{path} holds a different config (keys {', '.join(differing)}); "
                            "use another --workdir or the same config")
        return path
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return path


def _library_error_echoes(record: pylogging.LogRecord) -> bool:
    """False for the errors orbax logs from its background threads (with tracebacks) when a save or restore
    fails: the failure reaches our code, which reports it as one line; --verbose keeps them."""
    return not (record.levelno >= pylogging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _absl_main(call: Callable[[str], None]):
    """absl's main: no positional arguments, call(program name); a UserError, or an OSError (a file that cannot
    be written or read: read-only, missing, disk full), is printed as one line (with --verbose after its
    traceback) and exits with status 1."""

    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        program = os.path.basename(argv[0])
        if not _VERBOSE.value:
            pylogging.getLogger("absl").addFilter(_library_error_echoes)
        try:
            call(program)
        except (UserError, OSError) as error:
            if _VERBOSE.value:
                traceback.print_exception(error)
            message = str(error) if isinstance(error, UserError) else os_error_message(error)
            sys.exit(f"{program}: error: {message}")

    return absl_main


def run(main: Callable[[ml_collections.ConfigDict, str], None], inference: bool = False,
        check_config: bool = True) -> None:
    """Runs main(config, workdir) under absl with flags parsed as above and a UserError printed as one line.
    With `inference`, --config may be left out (the run's saved config is used). The whole config is checked
    first (pgpis_jax/config_checks.py; check_config=False: main does it), before anything is built, compiled or
    written; main validates the rest it needs; training and demos then record the config with
    `write_config_json`."""

    def call(program):
        if _WORKDIR.value is None:
            sys.exit(f"{program}: error: --workdir is required")
        if check_config:
            config_checks.check(_CONFIG.value)
        main(_CONFIG.value, _WORKDIR.value)

    parser = (lambda argv: parse_flags(with_saved_config(argv))) if inference else parse_flags
    app.run(_absl_main(call), flags_parser=parser)


def run_with_config(main: Callable[[ml_collections.ConfigDict], None]) -> None:
    """Runs main(config) under absl for commands that read a config and no run (python -m pgpis_jax.inspect)."""
    app.run(_absl_main(lambda program: main(_CONFIG.value)), flags_parser=parse_flags)


INFERENCE_ACTIONS = ("sample", "eval")


def run_method(action: str, options: Callable[[], dict] = dict) -> None:
    """The train/sample/eval/extract_features entry points: runs `action` of the method named by config.method.

    "train" goes to the shared trainer with the method's `build(config)` (the trainer records the config itself
    and allows the keys that may change when resuming, e.g. total_steps, to differ); a run stopped by SIGTERM or a
    preemption notice saves and exits with trainer.PREEMPTED_EXIT_CODE. "sample" and "eval" call the
    method module's `action(workdir, config=config, **options)`, which opens the run read-only. Other actions
    (extract_features) record the config as <workdir>/<action>_config.json and call `action(config, workdir,
    **options)`. `options()` returns the entry point's own flags given on the command line; a flag the action
    does not take is an error naming it."""

    def main(config, workdir):
        method = methods.get_method(config.method)
        config_checks.check(config)
        if action == "train":
            from pgpis_jax import trainer

            if trainer.train(method.build(config), config, workdir) == "preempted":
                sys.exit(trainer.PREEMPTED_EXIT_CODE)
            return
        function = getattr(method, action, None)
        if function is None:
            hint = {"sample": " (PCDMs samples through its stage-2 run: --workdir=<the pcdm_inpaint run> with "
                              "--prior_workdir / --refine_workdir)"}.get(action, "")
            raise UserError(f"method {config.method!r} has no {action} action{hint}")
        given = options()
        accepted = inspect.signature(function).parameters
        unknown = sorted(name for name in given if name not in accepted)
        if unknown:
            raise UserError(f"method {config.method!r} takes no {', '.join('--' + n for n in unknown)} for "
                            f"{action}")
        if action in INFERENCE_ACTIONS:
            function(workdir, config=config, **given)
        else:
            write_config_json(config, workdir, f"{action}_config.json")
            function(config, workdir, **given)

    run(main, inference=action in INFERENCE_ACTIONS, check_config=False)
