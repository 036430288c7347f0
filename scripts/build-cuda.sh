#!/usr/bin/env bash
# Builds `diffuse` with the CUDA backend on a machine without a CUDA toolkit: nvcc, the CUDA
# headers and the libraries candle links against come from NVIDIA's PyPI wheels, pinned to
# CUDA 13.0 (the PTX must not be newer than the driver of the GPU machine that runs it).
# Output: target-cuda/release/diffuse. Run it on the GPU machine with LD_LIBRARY_PATH holding
# the CUDA 13 libraries and cuDNN 9 (e.g. those of a PyTorch cu13x install); cuDNN's wheel here
# is only linked against (its soname, libcudnn.so.9, is what the binary asks for). With
# CUDA_TESTS=1 it also builds the GPU test binaries (diffuse-models' cuda_kernels and
# model_fixtures, diffuse-pipelines' cases) and lists their paths in target-cuda/test-binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-$PWD/.cuda-venv}
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cudnn-cu13==9.28.1.4
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
# The linker wants unversioned names; the CUDA driver (libcuda) is only a link-time stub here.
LINK=$PWD/target-cuda/link; mkdir -p "$LINK"
CUDNN=$("$VENV/bin/python" -c 'import nvidia.cudnn, os; print(list(nvidia.cudnn.__path__)[0])')
for l in "$CU"/lib/lib*.so.* "$CUDNN"/lib/lib*.so.*; do b=$(basename "$l"); ln -sf "$l" "$LINK/${b%%.so.*}.so"; done
if [ ! -s "$LINK/libcuda_stub.c" ]; then
    # Every cu* symbol cudarc references, as empty functions: enough to link, never called here.
    cargo fetch
    python3 scripts/cuda_stub.py "$LINK/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"
fi
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$LINK:$CU/lib:${LIBRARY_PATH:-}" RUSTFLAGS="-L $LINK ${RUSTFLAGS:-}"
# Without the default MPI feature: the GPU machine has no Open MPI libraries for the binary to
# load (a multi-GPU cluster that has them: --features cuda,mpi).
cargo build --release -p diffuse-cli --no-default-features --features cuda --target-dir target-cuda
if [ -n "${CUDA_TESTS:-}" ]; then
    cargo test --release -p diffuse-models -p diffuse-pipelines --features diffuse-models/cuda \
        --target-dir target-cuda --no-run --test cuda_kernels --test model_fixtures --test cases \
        --message-format=json \
        | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' > target-cuda/test-binaries
    cat target-cuda/test-binaries
fi
