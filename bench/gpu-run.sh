#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H100/H200 image: CUDA 13 driver, PyTorch
# with NVIDIA's cu13 libraries in python3's site-packages, no diffusers): `diffuse bench` on
# cuda:0 against PyTorch+diffusers on the same GPU. Expects the CUDA build of diffuse at
# target-cuda/release/diffuse (scripts/build-cuda.sh) and the diffusers wheels in .whl/.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# candle links libcublas/libcublasLt/libcurand/libnvrtc (cu13): use PyTorch's copies.
nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
bin=target-cuda/release/diffuse
chmod +x "$bin"
"$bin" --version
export DIFFUSE_TORCH_PYTHON=python3
"$bin" bench --device cuda:0 --runs 10 --warmup 2 --compare-torch --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.log"
