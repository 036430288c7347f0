# Sourced by the GPU run scripts: the output folder ($out), the CUDA libraries and cuDNN of the
# machine's PyTorch on LD_LIBRARY_PATH, the diffusers wheels of .whl/ importable, `unpack NAME`
# (a binary that bench/gpu-prepare.sh packed as .gpu-bin/NAME.xz, to /tmp/NAME), and $bin, the
# CUDA build of diffuse (.gpu-bin/diffuse-cuda.xz, else target-cuda/release/diffuse).
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# candle loads libcublas/libcublasLt/libcurand/libnvrtc (cu13) and libcudnn: PyTorch's copies.
nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The binaries travel xz-compressed (the transfer limit is 64 MiB).
unpack() {
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        ".gpu-bin/$1.xz" "/tmp/$1" && chmod +x "/tmp/$1"
}
bin=target-cuda/release/diffuse
if [ -f .gpu-bin/diffuse-cuda.xz ]; then
    unpack diffuse-cuda
    bin=/tmp/diffuse-cuda
fi
# (A cases call carries no diffuse.)
if [ -f "$bin" ]; then chmod +x "$bin" && "$bin" --version; fi
