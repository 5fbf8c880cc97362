#!/usr/bin/env bash
# Reproduces the bundled text-to-image model (dalle_fast/assets) from scratch with the project's own
# commands, on the built-in Shapes set with every green triangle held out of training (the Shapes
# split option), so that prompts naming one show zero-shot composition:
#   1. train-tokenizer  BPE on Shapes training captions
#   2. train-vae        small dVAE, 64x64 images -> 8x8 tokens of 512 codes (the dVAE recipe for
#                       noiseless synthetic data: auxiliary MSE, lr 2e-3, batch 8)
#      tune-vae-decoder then sharpens its decoder on the frozen encoder's tokens (tokens unchanged;
#                       small objects' shapes: scripts/dvae_ceiling.py), in four runs: 3000 steps on the
#                       training split, then on every image 2199 at half the step size, 3000 at 1.5e-4 and
#                       4000 at 1e-4 (--split all: the image codec sees green triangles, without captions;
#                       the transformer and CLIP never do); the bundle ships the last decoder
#   3. train-dalle      the transformer (paper schedule: row, column, row, conv), tokens cached once
#   4. train-clip       a small open_clip CLIP for reranking, trained with hard negatives (twins that
#                       differ only in one object's shape or size, or in swapped colours); 4-pixel patches
#                       so that a small object spans several (README: reranking; ~11 min of one core)
#   5. copy the exported model into dalle_fast/assets and draw docs/generate_grid.png
#
# Usage: scripts/make_bundled_model.sh [WORK_DIR]   (default build/bundled_model)
# Every size is an environment variable so that tests/test_bundled.py can run a shortened version:
#   VAE_CONFIG VAE_STEPS VAE_BATCH TUNE_STEPS TUNE_MINUTES TUNE2_STEPS TUNE2_MINUTES TUNE_MORE TUNE_MORE_MINUTES DALLE_STEPS DALLE_MINUTES CLIP_STEPS LENGTH BATCH N_SAMPLES KEEP DEST GRID THREADS PYTHON
# A step whose output is already in WORK_DIR (dVAE, tuned decoder, CLIP, transformer export) is not run again.
# CPU time with the defaults: about two hours from scratch in one run, not measured in one piece (1 thread;
# README: 28 minutes for the tokenizer, dVAE, transformer and the old 600-step CLIP, 30 minutes of decoder tuning
# on a loaded machine, 12 for the second tuning run, 50 and 26 for the third and fourth at load 2-6, about 11 for
# the 1200-step CLIP).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${1:-build/bundled_model}
PYTHON=${PYTHON:-.venv/bin/python}
VAE_CONFIG=${VAE_CONFIG:-small}  # small: 8x8 tokens (the bundle); small16: 16x16 tokens of 4x4 pixels (README:
                                 # far better small shapes on reconstructions; its transformer step measured 1.84 s
                                 # on 1 thread, so 8000 steps take about 4 hours: set DALLE_MINUTES='' or enough)
VAE_STEPS=${VAE_STEPS:-1500}
VAE_BATCH=${VAE_BATCH:-8}
TUNE_STEPS=${TUNE_STEPS:-3000}   # decoder tuning (batch 16), time-boxed by TUNE_MINUTES ('' = none)
TUNE_MINUTES=${TUNE_MINUTES-45}
TUNE2_STEPS=${TUNE2_STEPS:-2199} # second decoder run, every image (0 = skip: ship the first run's decoder)
TUNE2_MINUTES=${TUNE2_MINUTES-20}
# further decoder runs on every image, each from the previous one: STEPS:LR pairs ('' = none: ship the second's)
TUNE_MORE=${TUNE_MORE-"3000:1.5e-4 4000:1e-4"}
TUNE_MORE_MINUTES=${TUNE_MORE_MINUTES-60}   # time box of each of them
DALLE_STEPS=${DALLE_STEPS:-8000}
DALLE_MINUTES=${DALLE_MINUTES-35} # time box of the transformer's run (fewer steps on a busy machine; '' = none)
CLIP_STEPS=${CLIP_STEPS:-1200}
LENGTH=${LENGTH:-20000}          # Shapes items (training split) for the tokenizer, transformer and CLIP
BATCH=${BATCH:-32}
DEST=${DEST-dalle_fast/assets}   # where the bundle goes ('' to skip copying)
GRID=${GRID-docs/generate_grid.png}  # ('': no grid)
THREADS=${THREADS:-1}            # 1 is fastest for these small models on a shared machine
N_SAMPLES=${N_SAMPLES:-32}       # samples drawn per prompt of the grid, reranked by CLIP
KEEP=${KEEP:-6}                  # kept per prompt
CLI=("$PYTHON" -m dalle_fast.cli)
SEEN=("a large red circle" "a small blue square" "a large yellow triangle"
      "a small magenta circle above a large cyan square")
HELD_OUT=("a large green triangle" "a small green triangle"
          "a large green triangle to the left of a small red circle")

mkdir -p "$WORK"
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start)) s] $*"; }

stamp "1/5 tokenizer"
[ -f "$WORK/tokenizer.json" ] || \
  "${CLI[@]}" train-tokenizer --data shapes --shapes-count "$LENGTH" --vocab-size 256 --out "$WORK/tokenizer.json"

stamp "2/5 dVAE"
if [ ! -f "$WORK/vae/model/config.json" ]; then
  "${CLI[@]}" train-vae --data shapes --config "$VAE_CONFIG" --out "$WORK/vae" --steps "$VAE_STEPS" \
    --batch-size "$VAE_BATCH" --lr 2e-3 --mse-weight 1000 --threads 1 \
    --sample-every "$VAE_STEPS" --checkpoint-every "$VAE_STEPS" --no-progress
fi

stamp "2b/5 dVAE decoder tuned on frozen tokens"
[ -f "$WORK/vae/tuned/config.json" ] || \
  "${CLI[@]}" tune-vae-decoder --vae "$WORK/vae/model" --out "$WORK/vae/tuned" --steps "$TUNE_STEPS" \
    --batch-size 16 --lr 5e-4 --threads 1 --quiet ${TUNE_MINUTES:+--minutes "$TUNE_MINUTES"}
DECODER="$WORK/vae/tuned"
if [ "$TUNE2_STEPS" != 0 ]; then
  stamp "2c/5 dVAE decoder tuned on every image (no captions)"
  DECODER="$WORK/vae/tuned_all"
  [ -f "$DECODER/config.json" ] || \
    "${CLI[@]}" tune-vae-decoder --vae "$WORK/vae/tuned" --out "$DECODER" --split all --steps "$TUNE2_STEPS" \
      --batch-size 16 --lr 2.5e-4 --threads 1 --quiet ${TUNE2_MINUTES:+--minutes "$TUNE2_MINUTES"}
  i=0
  for run in $TUNE_MORE; do
    i=$((i + 1))
    stamp "2d/5 dVAE decoder tuned again on every image ($i: ${run%%:*} steps, lr ${run##*:})"
    PREVIOUS="$DECODER"
    DECODER="$WORK/vae/tuned_more$i"
    [ -f "$DECODER/config.json" ] || \
      "${CLI[@]}" tune-vae-decoder --vae "$PREVIOUS" --out "$DECODER" --split all --steps "${run%%:*}" \
        --batch-size 16 --lr "${run##*:}" --threads 1 --quiet ${TUNE_MORE_MINUTES:+--minutes "$TUNE_MORE_MINUTES"}
  done
fi

stamp "3/5 transformer"
[ -f "$WORK/dalle/export/dalle/config.json" ] || \
"${CLI[@]}" train-dalle --data shapes --split train --length "$LENGTH" --vae "$WORK/vae/model" \
  --tokenizer "$WORK/tokenizer.json" --out "$WORK/dalle" --preset shapes --text-len 16 \
  --steps "$DALLE_STEPS" --batch-size "$BATCH" --lr 1e-3 --warmup $((DALLE_STEPS / 20 + 1)) \
  --cache-tokens --ckpt-every "$DALLE_STEPS" --sample-every "$DALLE_STEPS" \
  --sample-captions "${SEEN[0]}" "${HELD_OUT[0]}" --threads "$THREADS" --export-fp16 --quiet \
  ${DALLE_MINUTES:+--max-minutes "$DALLE_MINUTES"}

stamp "4/5 CLIP"
[ -f "$WORK/clip/open_clip_config.json" ] || \
"${CLI[@]}" train-clip --data shapes --split train --length "$LENGTH" --tokenizer "$WORK/tokenizer.json" \
  --out "$WORK/clip" --text-len 16 --steps "$CLIP_STEPS" --batch-size 32 --width 64 --patch-size 4 --lr 2e-3 \
  --warmup $((CLIP_STEPS / 20)) --hard-negatives \
  --threads "$THREADS" --quiet
rm -rf "$WORK/dalle/export/clip" && mkdir -p "$WORK/dalle/export/clip"
cp "$WORK/clip/open_clip_config.json" "$WORK/clip/open_clip_model.safetensors" "$WORK/clip/tokenizer.json" \
  "$WORK/dalle/export/clip/"
# the tuned decoder (same encoder, so the transformer's tokens are unchanged)
rm -rf "$WORK/dalle/export/dvae" && cp -r "$DECODER" "$WORK/dalle/export/dvae"

stamp "5/5 bundle and grid"
if [ -n "$DEST" ]; then  # replaces the DALL-E parts only (DEST may hold other models, e.g. diffusion/)
  mkdir -p "$DEST"
  for part in "$WORK/dalle/export"/*; do
    name=$(basename "$part")
    rm -rf "$DEST/$name.new" && cp -r "$part" "$DEST/$name.new"
    rm -rf "$DEST/$name" && mv "$DEST/$name.new" "$DEST/$name"
  done
fi
if [ -n "$GRID" ]; then
  "${CLI[@]}" generate "${SEEN[@]}" "${HELD_OUT[@]}" --checkpoint "${DEST:-$WORK/dalle/export}" \
    -n "$N_SAMPLES" --keep "$KEEP" --seed 0 --threads "$THREADS" --out "$GRID"
fi
stamp "done: $(du -sh "${DEST:-$WORK/dalle/export}" | cut -f1) in ${DEST:-$WORK/dalle/export}"
