#!/usr/bin/env bash
# Prepares bench/gpu-run.sh's one run on a GPU machine, here (no GPU needed): the CUDA build of
# diffuse and of the GPU test binaries (scripts/build-cuda.sh with CUDA_TESTS=1), packed with xz
# into .gpu-bin/, and the wheels PyTorch's baseline needs there (diffusers and what the GPU
# image lacks) into .whl/, and the pipeline cases split into fixtures roots of at most 46 MiB
# (.gpu-cases/N, bench/gpu-cases.py). All three are git-ignored, for the device tool's `carry`;
# what each call carries, and the sparse checkout that keeps the rest of the working tree under
# the tool's 64 MiB, are in bench/gpu-run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_TESTS=1 scripts/build-cuda.sh
mkdir -p .gpu-bin .whl
xz -T0 -6 -c target-cuda/release/diffuse > .gpu-bin/diffuse-cuda.xz
while read -r exe; do
    name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
    xz -T0 -6 -c "$exe" > ".gpu-bin/$name.xz"
done < target-cuda/test-binaries
# The GPU image has Python 3.12, torch and transformers but not diffusers (nor one of its needs).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0
bench/gpu-cases.py
ls -la .gpu-bin .whl
