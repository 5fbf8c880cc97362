#!/usr/bin/env bash
# Rebuilds the bundled diffusion models (dalle_fast/assets/diffusion) from scratch with the project's
# own commands on the Shapes training split (every green triangle held out, as for the DALL-E bundle):
#   1. train-diffusion --model imagen   32x32 text-conditional base over the frozen MiniLM encoder
#   2. train-diffusion --model unclip   32x32 decoder conditioned on the bundled CLIP's image embedding
#   3. train-prior                      CLIP text embedding -> CLIP image embedding
#   4. train-upsampler                  32 -> 64 super-resolution (noise-conditioning augmentation), shared
# Each run is time-boxed (--max-minutes), so on a busy machine it takes fewer steps, not more time:
# about 56 minutes of wall time with the defaults (1 thread; the bundle's numbers are in the README).
# Usage: scripts/make_diffusion_models.sh [WORK_DIR]   (default build/diffusion_models)
# The U-Net stages use Min-SNR-gamma loss weighting (gamma 5), which at this budget (about a thousand
# steps per stage on a shared 2-core CPU) learned colour, size and shape much faster than plain MSE.
# Sizes are environment variables: IMAGEN_MIN UNCLIP_MIN PRIOR_MIN UP_MIN STEPS BATCH UP_BATCH THREADS PYTHON DEST
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${1:-build/diffusion_models}
PYTHON=${PYTHON:-.venv/bin/python}
IMAGEN_MIN=${IMAGEN_MIN:-20}
UNCLIP_MIN=${UNCLIP_MIN:-20}
PRIOR_MIN=${PRIOR_MIN:-4}
UP_MIN=${UP_MIN:-10}
STEPS=${STEPS:-20000}            # upper bound; the time boxes decide
BATCH=${BATCH:-32}
UP_BATCH=${UP_BATCH:-16}
THREADS=${THREADS:-1}
DEST=${DEST-dalle_fast/assets/diffusion}
CLI=("$PYTHON" -m dalle_fast.cli)
COMMON=(--threads "$THREADS" --steps "$STEPS" --warmup 50 --ckpt-every 200)
UNET=(--snr-gamma 5)

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
stage imagen train-diffusion --model imagen --batch-size "$BATCH" --max-minutes "$IMAGEN_MIN" "${COMMON[@]}" "${UNET[@]}"
stage unclip_decoder train-diffusion --model unclip --batch-size "$BATCH" --max-minutes "$UNCLIP_MIN" "${COMMON[@]}" "${UNET[@]}"
stage prior train-prior --batch-size 64 --max-minutes "$PRIOR_MIN" "${COMMON[@]}"
stage upsampler train-upsampler --batch-size "$UP_BATCH" --max-minutes "$UP_MIN" "${COMMON[@]}" "${UNET[@]}"
echo "trained in $(( $(date +%s) - t0 )) s"
if [ -n "$DEST" ]; then
  mkdir -p "$DEST"
  for m in imagen unclip_decoder prior upsampler; do
    rm -rf "${DEST:?}/$m" && cp -r "$WORK/$m/export" "$DEST/$m"
  done
  echo "copied to $DEST"
fi
