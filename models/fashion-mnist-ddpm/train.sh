#!/usr/bin/env bash
# How models/fashion-mnist-ddpm was trained: on a 2-core CPU (no GPU), all 60,000 Fashion-MNIST
# training images (scripts/fetch-data.sh), 7,000 steps of batch 64 (about 7.5 epochs), v-prediction
# with Min-SNR-5 loss weighting, bf16 autocast (f32 where the CPU has no bf16 dot products), and no
# random flips: Fashion-MNIST's shoes point left, and a mirrored one is off the data.
# Writes the diffusers folder plus train_config.json, metrics.jsonl, loss.png and the sample
# grids to the output folder (default runs/fashion-mnist-ddpm).
set -euo pipefail
cd "$(dirname "$0")/../.."
diffuse=${DIFFUSE:-target/release/diffuse}
"$diffuse" train --dataset fashion-mnist --classes 10 --resolution 32 --channels 32,64,64 \
  --layers-per-block 1 --attention lowest --prediction-type v-prediction --snr-gamma 5 --random-flip false --mixed-precision bf16 --batch-size 64 --lr 5e-4 --warmup 200 \
  --lr-schedule cosine --ema-decay 0.999 --sample-steps 50 --guidance-scale 2 --seed 0 \
  --steps 7000 --output "${1:-runs/fashion-mnist-ddpm}"
