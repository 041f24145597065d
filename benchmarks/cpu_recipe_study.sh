#!/usr/bin/env bash
# Recipes at equal CPU budget: ResNet-18 pre-trained on 15,360 images by each recipe, 3-15 min on 2 cores
# (classification on Anderson IFS, SimSiam on fractal pairs, OFDB-4AD's 1000 fixed fractals + augmentation,
# MandelbulbVAR-1k on the fly), then PatchCore (STUDY_METHODS) on ../shared/realdata (hazelnut, transistor;
# 10 training shots, seeds 0-5) against a random-init control. benchmarks/RESULTS.md, "Recipes at equal CPU
# budget", reports its output; `python3 benchmarks/cpu_recipe_table.py runs/recipe_study` prints the tables
# (paired by seed), and the script ends with `ad-eval report --control random` of all cells in
# runs/recipe_study/report (the same differences to the control in control_mvtec_10shot.{md,csv,png}).
#   bash benchmarks/cpu_recipe_study.sh [recipe ...]     # default: random anderson selfsup ofdb mandelbulbvar
# STUDY_SCALE=4 trains each backbone 4x the configs' steps (same schedules, stretched); STUDY_OUT names the folder.
# STUDY_BN_STATS=train evaluates with AdaBN (`ad-eval run --bn-stats train`, cells labelled NAME+adabn) the
# backbones of STUDY_OUT (those a previous run left are not trained again).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
OUT=${STUDY_OUT:-runs/recipe_study}
SEEDS=${STUDY_SEEDS:-0 1 2 3 4 5}
ROOT=${STUDY_ROOT:-../shared/realdata}
METHODS=${STUDY_METHODS:-patchcore}
SCALE=${STUDY_SCALE:-1}
BN_STATS=${STUDY_BN_STATS:-source}
declare -A CONFIG=([anderson]=cpu_r18 [selfsup]=cpu_selfsup_r18 [ofdb]=cpu_ofdb_r18
                  [mandelbulbvar]=cpu_mandelbulbvar_r18)

steps_of() {  # the config's trainer.max_steps
  sed -n 's/^  max_steps: *\([0-9]*\).*/\1/p' "$1"
}

evaluate() {  # evaluate NAME BACKBONE
  for seed in $SEEDS; do for category in hazelnut_reduced transistor_reduced; do for method in $METHODS; do
    nice -n 5 "$PY" -m ad_eval run --method "$method" --dataset mvtec --root "$ROOT" --category "$category" \
      --backbone "$2" --arch resnet18 --name "$1" --seed "$seed" --shots 10 --device cpu --out "$OUT/eval" \
      --bn-stats "$BN_STATS"
  done; done; done
}

recipes=("$@")
[[ ${#recipes[@]} -gt 0 ]] || recipes=(random anderson selfsup ofdb mandelbulbvar)
for name in "${recipes[@]}"; do
  if [[ $name == random ]]; then evaluate random random; continue; fi
  if [[ -z ${CONFIG[$name]:-} ]]; then
    echo "cpu_recipe_study.sh: unknown recipe $name (random ${!CONFIG[*]})" >&2
    exit 2
  fi
  folder=$OUT/pretrain_$name
  config=jobs/pretrain/${CONFIG[$name]}.yaml
  [[ -f $folder/backbone.pt ]] || nice -n 5 "$PY" -m fractal_pretrain fit --config "$config" \
    --trainer.default_root_dir "$folder" --trainer.max_steps $(( $(steps_of "$config") * SCALE ))
  evaluate "$name" "$folder/backbone.pt"
done
# the paper-shaped tables and figures of every cell so far (mean and sd over seeds per category)
labels=""
for b in random anderson selfsup ofdb mandelbulbvar; do for label in "$b" "$b+adabn"; do  # those with cells
  if compgen -G "$OUT/eval/*_${label}_*" >/dev/null; then labels+=${labels:+,}$label; fi
done; done
# and each backbone's difference to the random-init control, paired by seed (control_mvtec_10shot.*)
control=()
[[ ,$labels, == *,random,* ]] && control=(--control random)
"$PY" -m ad_eval report --results "$OUT/eval" --out "$OUT/report" --backbones "$labels" "${control[@]}"
