#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine that has only Python 3.12 with
# PyTorch, NumPy and SciPy, and no network: downloaded here (about 41 MB) into DIR, to be carried
# beside the checkout. See gpu_check.py's docstring for how to install and run them there.
set -euo pipefail
dir=${1:?usage: gpu_wheels.sh DIR [PYTHON_VERSION]}
python_version=${2:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$dir" \
    gymnasium cloudpickle farama-notifications typing-extensions \
    pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv \
    pyyaml scikit-learn joblib threadpoolctl \
    matplotlib pillow kiwisolver fonttools contourpy cycler pyparsing python-dateutil six \
    packaging ale-py minatar
du -sh "$dir"
