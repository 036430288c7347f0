# Sourced by the GPU run scripts: the output folder ($out), the CUDA libraries of the machine's
# PyTorch on LD_LIBRARY_PATH, the diffusers wheels of .whl/ importable, and $bin, the CUDA build
# of diffuse (.gpu-bin/diffuse-cuda.xz, else target-cuda/release/diffuse).
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# candle links libcublas/libcublasLt/libcurand/libnvrtc (cu13): use PyTorch's copies.
nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
bin=target-cuda/release/diffuse
if [ -f .gpu-bin/diffuse-cuda.xz ]; then
    # The CUDA binary travels xz-compressed (the transfer limit is 64 MiB).
    python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.gpu-bin/diffuse-cuda.xz'), open('/tmp/diffuse-cuda', 'wb'))"
    bin=/tmp/diffuse-cuda
fi
chmod +x "$bin"
"$bin" --version
