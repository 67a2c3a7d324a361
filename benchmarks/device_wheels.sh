#!/usr/bin/env bash
# Wheels that a GPU machine without DeepSpeed needs to run benchmarks/device_check.sh, written to
# .whl/ (git-ignored). Run it here, where pip reaches the package registries; the GPU machine
# cannot. Its image has torch, transformers, timm, pluggy, pyyaml, pillow, numpy and DeepSpeed's
# other needs (ninja, psutil, msgpack, einops, py-cpuinfo, nvidia-ml-py), so only DeepSpeed and
# what it needs beyond them travel: DeepSpeed is published as source only, so its wheel is built
# here (pure Python; its CUDA ops are JIT-built where they run), and pydantic and pydantic-core
# are taken at the versions installed here (pydantic pins its core exactly).
#
#   bash benchmarks/device_wheels.sh            # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}   # the GPU machine's python3
mkdir -p .whl
rm -f .whl/*.whl
version() { python -c "from importlib.metadata import version; print(version('$1'))"; }
python -m pip wheel --quiet --no-deps "deepspeed==$(version deepspeed)" -w .whl
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)"  # pydantic-core needs a newer one than torch does
ls -l .whl
