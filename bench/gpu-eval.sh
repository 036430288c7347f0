#!/usr/bin/env bash
# One prepared GPU run for the training issue: `diffuse eval` of the bundled Fashion-MNIST model at
# several guidance scales (500 samples per class each), then training images/s of `diffuse train`
# and of PyTorch + diffusers (bench/train-speed.sh) on the same GPU. Needs Fashion-MNIST IDX
# files (train and t10k) in $DATA (default data/fashion-mnist) and what bench/gpu-env.sh needs. Writes at most 8 files (the device
# tool's limit): eval.log, eval.jsonl, grid-g{2,3,4}.png, train-speed.log.
set -uo pipefail
. "$(dirname "$0")/gpu-env.sh"
export DATA=${DATA:-data/fashion-mnist}
for g in ${GUIDANCE:-1 2 3 4 5}; do
    grid=()
    case $g in 2|3|4) grid=(--grid "$out/grid-g$g.png") ;; esac
    "$bin" eval --device cuda:0 --data "$DATA" --guidance-scale "$g" --samples-per-class "${SAMPLES:-500}" \
        --batch-size 1000 --json /tmp/eval.json "${grid[@]}" 2>&1 | grep -v "^\s*$" | tee -a "$out/eval.log"
    python3 -c 'import json; print(json.dumps(json.load(open("/tmp/eval.json"))))' >> "$out/eval.jsonl"
done
DIFFUSE=$bin PYTHON=python3 bench/train-speed.sh "${BATCH:-128}" "${STEPS:-60}" cuda:0 2>&1 | tee "$out/train-speed.log"
