#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/accelerator.sh installs on a GPU machine that has jax[cuda], torch and
# transformers but no network (this workplace's: Python 3.12, x86-64). Run it on a machine with network; .whl/ is
# git-ignored, so the device tool needs carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 ml_collections==1.1.0
ls .whl
