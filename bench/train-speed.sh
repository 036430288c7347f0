#!/usr/bin/env bash
# Training speed of the bundled model's config: `diffuse train` and PyTorch + diffusers
# (bench/torch_train.py), one after the other on this machine, same batch, same thread count.
# Usage: bench/train-speed.sh [batch] [steps] [device]   (default 32 30 cpu)
# Env: DIFFUSE (the binary; default target/release/diffuse), PYTHON (with torch + diffusers),
# DATA (Fashion-MNIST IDX folder; default data/fashion-mnist), PRECISION (no or bf16: mixed
# precision on both sides, `--mixed-precision bf16` and torch.autocast; default no).
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-32}
steps=${2:-30}
device=${3:-cpu}
bin=${DIFFUSE:-target/release/diffuse}
py=${PYTHON:-python3}
data=${DATA:-data/fashion-mnist}
threads=${THREADS:-$(nproc)}
precision=${PRECISION:-no}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cfg=models/fashion-mnist-ddpm/unet/config.json
torch_device=${device%%:*}
# The bundled model's architecture, as its README's training command gives it; random flips on
# both sides, as bench/torch_train.py does.
"$bin" train --device "$device" --threads "$threads" --dataset fashion-mnist --data "$data" --max-images 24000 \
  --classes 10 --resolution 32 --channels 32,64,64 --layers-per-block 1 --attention lowest \
  --batch-size "$batch" --lr 5e-4 --warmup 200 --ema-decay 0.999 --seed 0 --mixed-precision "$precision" \
  --random-flip true \
  --steps "$steps" --checkpoint-every 0 --num-samples 0 --output "$out/run" 2>&1 \
  | tr '\r' '\n' | grep "trained steps" | tee "$out/ours.txt"
ours=$(sed -E 's/.*\(([0-9.]+) images\/s.*/\1/' "$out/ours.txt")
theirs=$("$py" bench/torch_train.py --config "$cfg" --data "$data" --batch-size "$batch" --steps "$steps" \
  --threads "$threads" --device "$torch_device" --mixed-precision "$precision")
echo "torch: $theirs"
t=$(echo "$theirs" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])')
"$py" -c "print(f'training images/s, batch $batch, $threads threads, $device, mixed precision $precision: diffuse {float($ours):.1f}, PyTorch {float($t):.1f} -> diffuse/PyTorch speed {float($ours)/float($t):.2f}x')"
