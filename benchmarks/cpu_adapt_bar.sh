#!/usr/bin/env bash
# Issue 14's bar at CPU scale for one backbone: `fractal-pretrain adapt` (jobs/adapt/cpu_r18.yaml, 300 steps,
# lr 1e-3, milestones at 0.7 and 0.9) once per seed, then PatchCore and FeatureNorm on ../shared/realdata
# (hazelnut, transistor; 10 training shots) on the raw and on the projected features, cell seed = adapt seed.
# benchmarks/RESULTS.md, "Issue-14 bar ...", reports its output; the paired table (+adapt - raw, by seed):
#   python3 benchmarks/cpu_recipe_table.py BAR_OUT --control NAME
#   bash benchmarks/cpu_adapt_bar.sh BACKBONE.pt NAME      # e.g. runs/recipe_study_x4/pretrain_anderson/backbone.pt
# BAR_OUT (default runs/adapt_bar_NAME), BAR_SEEDS (0-5), BAR_METHODS, BAR_STEPS (300), BAR_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
if [[ $# -ne 2 || ! -f $1 ]]; then
  echo "cpu_adapt_bar.sh: usage: cpu_adapt_bar.sh BACKBONE.pt NAME (backbone file ${1:-missing} not found)" >&2
  exit 2
fi
BACKBONE=$1 NAME=$2
OUT=${BAR_OUT:-runs/adapt_bar_$NAME}
SEEDS=${BAR_SEEDS:-0 1 2 3 4 5}
METHODS=${BAR_METHODS:-patchcore featurenorm}
STEPS=${BAR_STEPS:-300}
ROOT=${BAR_ROOT:-../shared/realdata}

cell() {  # cell METHOD CATEGORY SEED LABEL [--projector FILE]
  local method=$1 category=$2 seed=$3 label=$4
  shift 4
  nice -n 5 "$PY" -m ad_eval run --method "$method" --dataset mvtec --root "$ROOT" --category "$category" \
    --backbone "$BACKBONE" --name "$label" --seed "$seed" --shots 10 --device cpu --out "$OUT/eval" "$@"
}

for seed in $SEEDS; do
  adapted=$OUT/adapt_s$seed
  # exact resume: a killed adapt continues from its last.ckpt when the same command runs again
  [[ -f $adapted/projector.pt ]] || nice -n 5 "$PY" -m fractal_pretrain adapt --config jobs/adapt/cpu_r18.yaml \
    --model.backbone "$BACKBONE" --trainer.max_steps "$STEPS" --trainer.val_check_interval "$STEPS" \
    --model.milestones "[$(( STEPS * 7 / 10 )), $(( STEPS * 9 / 10 ))]" --model.lr 1e-3 \
    --trainer.log_every_n_steps 5 --seed_everything "$seed" --model.seed "$seed" \
    --trainer.default_root_dir "$adapted"
  for category in hazelnut_reduced transistor_reduced; do for method in $METHODS; do
    cell "$method" "$category" "$seed" "$NAME"
    cell "$method" "$category" "$seed" "$NAME+adapt" --projector "$adapted/projector.pt"
  done; done
done
