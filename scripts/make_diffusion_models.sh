#!/usr/bin/env bash
# Rebuilds the bundled diffusion models (dalle_fast/assets/diffusion) from scratch with the project's
# own commands on the Shapes training split (every green triangle held out, as for the DALL-E bundle):
#   1. train-diffusion --model imagen   32x32 text-conditional base over the frozen MiniLM encoder
#   2. train-diffusion --model unclip   32x32 decoder conditioned on the bundled CLIP's image embedding
#   3. train-prior                      CLIP text embedding -> CLIP image embedding
#   4. train-upsampler                  32 -> 64 super-resolution (noise-conditioning augmentation), shared
#   5. imagen_more, unclip_decoder_more  second stages of the two 32x32 U-Nets: --init the first stage's
#                                        export (a warm restart: fresh optimizer and cosine schedule, lr / 2)
# Equal training compute: the bundled DALL-E took 58 minutes of wall time at 1 thread (README: 28 for
# tokenizer, dVAE, transformer and CLIP, 30 for the dVAE decoder tuning), so each family gets 58 minutes:
#   Imagen = base 20 + 28 (imagen_more) + upsampler 10;  unCLIP = decoder 20 + 24 (more) + prior 4 + upsampler 10
# Each run is time-boxed (--max-minutes), so on a busy machine it takes fewer steps, not more time:
# 106 minutes of wall time with the defaults (1 thread; the bundle's steps and CPU times are in the README).
# Usage: scripts/make_diffusion_models.sh [WORK_DIR]   (default build/diffusion_models)
# The U-Net stages use Min-SNR-gamma loss weighting (gamma 5), which at this budget (about a thousand
# steps per stage on a shared 2-core CPU) learned colour, size and shape much faster than plain MSE.
# Sizes are environment variables: IMAGEN_MIN IMAGEN_MORE_MIN UNCLIP_MIN UNCLIP_MORE_MIN PRIOR_MIN UP_MIN
#   STEPS BATCH UP_BATCH LR MORE_LR THREADS PYTHON DEST  (a *_MORE_MIN of 0 skips that second stage)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${1:-build/diffusion_models}
PYTHON=${PYTHON:-.venv/bin/python}
IMAGEN_MIN=${IMAGEN_MIN:-20}
IMAGEN_MORE_MIN=${IMAGEN_MORE_MIN:-28}
UNCLIP_MIN=${UNCLIP_MIN:-20}
UNCLIP_MORE_MIN=${UNCLIP_MORE_MIN:-24}
PRIOR_MIN=${PRIOR_MIN:-4}
UP_MIN=${UP_MIN:-10}
STEPS=${STEPS:-20000}            # upper bound; the time boxes decide
BATCH=${BATCH:-32}
UP_BATCH=${UP_BATCH:-16}
LR=${LR:-1e-3}                   # the U-Net stages' first run (the trainer's default)
MORE_LR=${MORE_LR:-5e-4}         # their second stage (a warm restart from the first one's EMA weights)
THREADS=${THREADS:-1}
DEST=${DEST-dalle_fast/assets/diffusion}
CLI=("$PYTHON" -m dalle_fast.cli)
COMMON=(--threads "$THREADS" --steps "$STEPS" --warmup 50 --ckpt-every 200)
UNET=(--snr-gamma 5)
# seed 1: the second stage draws other noise, timesteps and batches than the first (seed 0)
MORE=(--lr "$MORE_LR" --seed 1)

# a stage whose export is already in WORK_DIR is not run again (rerun the script to finish a broken run)
stage() {
  local name=$1
  shift
  if [ -f "$WORK/$name/export/model.safetensors" ]; then
    echo "$name: $WORK/$name/export exists, skipped"
  else
    "${CLI[@]}" "$@" --out "$WORK/$name"
  fi
}

mkdir -p "$WORK"
t0=$(date +%s)
stage imagen train-diffusion --model imagen --batch-size "$BATCH" --max-minutes "$IMAGEN_MIN" --lr "$LR" "${COMMON[@]}" "${UNET[@]}"
stage unclip_decoder train-diffusion --model unclip --batch-size "$BATCH" --max-minutes "$UNCLIP_MIN" --lr "$LR" "${COMMON[@]}" "${UNET[@]}"
stage prior train-prior --batch-size 64 --max-minutes "$PRIOR_MIN" "${COMMON[@]}"
stage upsampler train-upsampler --batch-size "$UP_BATCH" --max-minutes "$UP_MIN" "${COMMON[@]}" "${UNET[@]}"
# the shipped 32x32 U-Nets: the second stage's export, or the first's when its minutes are 0
IMAGEN_RUN=imagen
UNCLIP_RUN=unclip_decoder
if [ "$IMAGEN_MORE_MIN" != 0 ]; then
  stage imagen_more train-diffusion --model imagen --init "$WORK/imagen/export" --batch-size "$BATCH" \
    --max-minutes "$IMAGEN_MORE_MIN" "${COMMON[@]}" "${UNET[@]}" "${MORE[@]}"
  IMAGEN_RUN=imagen_more
fi
if [ "$UNCLIP_MORE_MIN" != 0 ]; then
  stage unclip_decoder_more train-diffusion --model unclip --init "$WORK/unclip_decoder/export" --batch-size "$BATCH" \
    --max-minutes "$UNCLIP_MORE_MIN" "${COMMON[@]}" "${UNET[@]}" "${MORE[@]}"
  UNCLIP_RUN=unclip_decoder_more
fi
echo "trained in $(( $(date +%s) - t0 )) s"
if [ -n "$DEST" ]; then
  mkdir -p "$DEST"
  for pair in "imagen:$IMAGEN_RUN" "unclip_decoder:$UNCLIP_RUN" prior:prior upsampler:upsampler; do
    m=${pair%%:*}
    rm -rf "${DEST:?}/$m" && cp -r "$WORK/${pair#*:}/export" "$DEST/$m"
  done
  echo "copied to $DEST"
fi
