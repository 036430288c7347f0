#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool's H100/H200 image: CUDA 13 driver, PyTorch
# with NVIDIA's cu13 libraries and cuDNN in python3's site-packages, no diffusers), after
# bench/gpu-prepare.sh here:
# 1. the GPU tests on cuda:0: the fused CUDA kernels against the generic ops (f32/f16/bf16) and
#    every model parity fixture (f32, the fixtures' tolerances);
# 2. `diffuse bench` in $DTYPE (default f16) against PyTorch + diffusers in the same dtype with
#    SDPA attention, on the same GPU: the ops, the SD 1.5 UNet step, VAE decode and CLIP, the SDXL
#    UNet step, whole SD 1.5 (512², 20 steps) and SDXL (1024², 20 steps) images, each line with
#    its peak GPU memory. SKIP_TESTS / SKIP_BENCH leave a part out; ONLY picks bench lines;
#    PROFILE (line names) adds a per-layer profile of those lines; VARIANTS and VARIANT_LINES
#    run lines again under other settings (see below);
# 3. with CASES=.gpu-cases/N (then also SKIP_TESTS=1 SKIP_BENCH=1), the whole-pipeline parity
#    cases of that root on cuda:0: in f32 at each case's tolerance, then in f16 at 16 unit
#    roundoffs of each tensor's largest value (CASES_DEVICE=cpu rehearses the call here).
# The device tool's calls (one working tree of at most 64 MiB each; sparse checkouts drop the
# fixtures a call does not read, `git sparse-checkout disable` after):
#   tests and bench: sparse bench/gpu-sparse.txt; carry .gpu-bin/diffuse-cuda.xz,
#     .gpu-bin/cuda_kernels.xz, .gpu-bin/model_fixtures.xz and .whl
#   each cases root: sparse bench/gpu-sparse-cases.txt; carry .gpu-bin/cases.xz and .gpu-cases/N
set -uo pipefail
. "$(dirname "$0")/gpu-env.sh"
export DIFFUSE_TORCH_PYTHON=python3 DIFFUSE_FIXTURES=$PWD/fixtures
if [ -z "${SKIP_TESTS:-}" ]; then
    for t in cuda_kernels model_fixtures; do
        unpack "$t" || continue
        DIFFUSE_DEVICE=cuda:0 timeout 240 "/tmp/$t" --test-threads 1 --nocapture > "$out/test-$t.log" 2>&1
        echo "$t: exit $?"
        grep -E "^test |test result|panicked|Error|max \|diff\|" "$out/test-$t.log" | tail -60
    done
fi
[ -n "${SKIP_BENCH:-}" ] || "$bin" bench --device cuda:0 --dtype "${DTYPE:-f16}" --configs fixtures_configs \
    --runs "${RUNS:-10}" --warmup 2 --compare-torch --pipeline --large \
    --only "${ONLY:-op,unet sd15,unet sdxl,vae sd15 decode,clip,pipeline}" \
    --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.log"
if [ -n "${CASES:-}" ] && unpack cases; then
    for dtype in f32 f16; do
        log=$out/test-cases-$(basename "$CASES")-$dtype.log
        DIFFUSE_DEVICE=${CASES_DEVICE:-cuda:0} DIFFUSE_DTYPE=$dtype DIFFUSE_FIXTURES="$PWD/$CASES" \
            timeout 300 /tmp/cases --nocapture > "$log" 2>&1
        echo "cases $CASES in $dtype: exit $?"
        grep -E ": ok \(|cases (passed|failed)|^  [a-z][a-z0-9_]*: |test result" "$log" \
            | cut -c1-400 | tail -40
    done
fi
# The lines in $VARIANT_LINES again under each setting of $VARIANTS, in the same run: e.g.
# "DIFFUSE_CUDA_CONV=cudnn DIFFUSE_CUDA_ATTENTION=materialized" (candle's cuDNN convolutions;
# attention through the score matrix).
for setting in ${VARIANTS:-}; do
    echo "== $setting"
    env "$setting" "$bin" bench --device cuda:0 --dtype "${DTYPE:-f16}" --configs fixtures_configs \
        --runs "${RUNS:-10}" --warmup 2 --large --only "${VARIANT_LINES:-unet sd15 step}" 2>&1
done | tee "$out/bench-variants.log"
# Where the time of the lines in $PROFILE goes, per kind of layer (each layer synchronised).
[ -z "${PROFILE:-}" ] || "$bin" bench --device cuda:0 --dtype "${DTYPE:-f16}" --configs fixtures_configs \
    --runs 3 --warmup 1 --profile --large --only "$PROFILE" 2>&1 | tee "$out/profile.log"

# Optional: train the bundled Fashion-MNIST model on this GPU when a dataset folder is given
# (IDX files), sizing the run to TRAIN_SECONDS from a short probe.
if [ -n "${TRAIN_DATA:-}" ]; then
    secs=${TRAIN_SECONDS:-200}
    common=(train --device cuda:0 --dataset fashion-mnist --data "$TRAIN_DATA" --classes 10 --resolution 32
        --channels 32,64,64 --layers-per-block 1 --attention lowest --batch-size 128 --lr 5e-4 --warmup 200
        --lr-schedule cosine --ema-decay 0.999 --sample-steps 50 --guidance-scale 2 --seed 0)
    t0=$(date +%s.%N)
    "$bin" "${common[@]}" --steps 40 --output /tmp/probe --sample-every 100000 --checkpoint-every 100000 2>&1 | tail -3
    t1=$(date +%s.%N)
    steps=${TRAIN_STEPS:-$(python3 -c "print(max(100, int($secs * 40 / ($t1 - $t0))))")}
    echo "probe: 40 steps in $(python3 -c "print(round($t1 - $t0, 1))") s; training $steps steps"
    "$bin" "${common[@]}" --steps "$steps" --output /tmp/fm --sample-every "$steps" --checkpoint-every 1000000 \
        --log-every 100 > "$out/train.log" 2>&1
    tail -5 "$out/train.log"; ls -R /tmp/fm | head -30
    # At most 8 files come back: the diffusers folder, the last sample grid, the logs.
    mkdir -p "$out/fm/unet" "$out/fm/scheduler"
    cp /tmp/fm/model_index.json "$out/fm/"
    cp /tmp/fm/unet/config.json /tmp/fm/unet/diffusion_pytorch_model.safetensors "$out/fm/unet/"
    cp /tmp/fm/scheduler/scheduler_config.json "$out/fm/scheduler/"
    find /tmp/fm/samples -name "*.png" | sort | tail -1 | xargs -r -I{} cp {} "$out/samples.png"
fi
