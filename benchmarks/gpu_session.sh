#!/usr/bin/env bash
# Device-machine calls for the GPU checks, one stage per call (each well inside the 10-minute call limit).
# Run from the repo root on the GPU machine, carrying .whl (../shared/gpu/README.md) and, for `pretrain`,
# `ofdb-pretrain` and `adapt`, .gpu_data holding .gpu_data/realdata (the jobs/eval configs' root:
# `mkdir -p .gpu_data && cp -r ../shared/realdata .gpu_data/`); everything worth keeping lands in $OUT
# (./gpu-logs without it).
#
#   bash benchmarks/gpu_session.sh kernels    # GPU tests, render images/s + per-kernel ms, train throughput (~5 min)
#   bash benchmarks/gpu_session.sh pretrain   # short resnet18 pre-training, then AD eval vs random init (~8 min)
#   bash benchmarks/gpu_session.sh versions   # each renderer version in .bench-versions side by side (~1 min each)
#   bash benchmarks/gpu_session.sh mandelbulb # Mandelbulb GPU tests, both modes' images/s, WRN50 vs ceiling (~7 min)
#   bash benchmarks/gpu_session.sh ofdb       # OFDB GPU tests, end to end vs model-only ceiling at OFDB settings (~3 min)
#   bash benchmarks/gpu_session.sh ofdb-pretrain  # jobs/pretrain/ofdb_short_r50.yaml, then PatchCore vs random init
#   bash benchmarks/gpu_session.sh selfsup    # selfsup GPU tests, SimSiam two-view step vs its ceiling (~3 min)
#   bash benchmarks/gpu_session.sh adapt      # adapt step cost (wrn50), then the short_r18 projector, raw vs
#                                             # projected PatchCore/FeatureNorm (needs runs/short_r18 from
#                                             # `pretrain` on the same warm machine, or .gpu_data/short_r18/
#                                             # backbone.pt + backbone.json carried; ~8 min)
#
# `versions` needs .bench-versions (bash benchmarks/kernel_versions.sh [COMMIT...], then carry it too): anderson
# and fractal4ad images/s with per-kernel ms for every version and the working tree, and an image digest per
# row that must be the same for all versions (they all draw the reference's images). Other recipes and options:
# VERSION_RECIPES=mandelbulbvar VERSION_ARGS="--set mode=on_the_fly --repeats 3" bash benchmarks/gpu_session.sh versions
#
# $OUT brings back at most 8 files of 16 MiB, 64 MiB in all: a few logs, one archive, and backbone.pt in 15 MiB
# parts (cat backbone.pt.part-* > backbone.pt) where it is at most 48 MiB (resnet18; not ofdb-pretrain's resnet50).
set -uo pipefail
stage="${1:?usage: gpu_session.sh kernels|pretrain|versions|mandelbulb|ofdb|ofdb-pretrain|selfsup|adapt}"
out="${OUT:-gpu-logs}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FRACTAL_PRETRAIN_CACHE=/tmp/fp-cache
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"
  # where CuPy finds the CUDA headers and NVRTC its kernels compile with (a RawModule build fails without them)
  python3 -c "import cupy; cupy.show_config()"
} > "$out/device.txt" 2>&1
# Every stage renders on the GPU through CuPy: without it the gpu tests all skip and each command fails on its
# own, minutes of the session for nothing; one line now (why: device.txt)
if ! python3 -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" >> "$out/device.txt" 2>&1; then
  echo "gpu_session.sh $stage: CuPy cannot use a GPU here (import or device count failed: see device.txt)" \
    | tee -a "$out/device.txt" >&2
  exit 2
fi

# pretrain_and_report NAME BACKBONES: jobs/pretrain/NAME.yaml, its backbone in parts, then jobs/eval/NAME.yaml
# and the report comparing BACKBONES (the first one the control); one archive: training curve, backbone.json, evaluation records and the
# report (tables, figures)
pretrain_and_report() {
  local name=$1 backbones=$2 run=runs/$1
  python3 -m fractal_pretrain fit --config "jobs/pretrain/$name.yaml" --trainer.enable_progress_bar false \
    --ckpt_path none > "$out/pretrain.log" 2>&1  # streamed: a run cut at the limit still brings its log back
  # $OUT comes back only within 8 files and 64 MiB: backbone.pt in parts if it leaves room for the other four
  # files (resnet18: 43 MiB, 3 parts); a resnet50's (~90 MiB) stays on the machine, in $run
  if [ ! -f "$run"/backbone.pt ]; then
    echo "gpu_session.sh: no $run/backbone.pt: the fit failed (see above)" >> "$out/pretrain.log"
  elif [ "$(stat -c %s "$run"/backbone.pt)" -le $((48 * 1024 * 1024)) ]; then
    split -b 15M -d "$run"/backbone.pt "$out/backbone.pt.part-"
  else
    echo "gpu_session.sh: $run/backbone.pt is over 48 MiB, too large to bring back from \$OUT; kept in $run" \
      | tee -a "$out/pretrain.log"
  fi
  python3 -m ad_eval grid --config "jobs/eval/$name.yaml" --cluster local --out "results/$name" \
    > "$out/eval.log" 2>&1
  python3 -m ad_eval report --results "results/$name" --out "reports/$name" --backbones "$backbones" \
    --control "${backbones%%,*}" >> "$out/eval.log" 2>&1
  cat "reports/$name"/table_*AUROC*.md "reports/$name"/control_*.md >> "$out/eval.log" 2>/dev/null
  tar czf "$out/$name.tar.gz" "$run"/logs/version_*/metrics.csv "$run"/backbone.json "results/$name" \
    "reports/$name"
}

# The stages that end in an evaluation on the real samples stop here, not after minutes of training
case "$stage" in
  pretrain|ofdb-pretrain|adapt)
    for category in hazelnut_reduced transistor_reduced; do
      if [ ! -d ".gpu_data/realdata/$category" ]; then
        echo "gpu_session.sh $stage: .gpu_data/realdata/$category is missing: carry .gpu_data" \
          "(mkdir -p .gpu_data && cp -r ../shared/realdata .gpu_data/)" | tee -a "$out/device.txt" >&2
        exit 2
      fi
    done
    ;;
esac

case "$stage" in
  kernels)
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.log"
    python3 benchmarks/render_throughput.py --device cuda --profile 2>&1 | tee "$out/render.jsonl"
    # 512 items x 256 chains fill half an H100's thread slots: does doubling the chains speed up the chaos game?
    python3 benchmarks/render_throughput.py --device cuda --profile --recipes anderson,fractal4ad --set chains=512 \
      2>&1 | tee -a "$out/render.jsonl"
    python3 benchmarks/train_throughput.py --archs resnet18,wide_resnet50_2 2>&1 | tee "$out/train.jsonl"
    # the same with float32 input, as measured before the bfloat16 batches: what the dtype alone changes
    python3 benchmarks/train_throughput.py --archs resnet18 --dtype float32 2>&1 | tee -a "$out/train.jsonl"
    python3 benchmarks/summarise.py "$out/render.jsonl" "$out/train.jsonl" | tee "$out/summary.md"
    ;;
  pretrain)
    pretrain_and_report short_r18 Random,Fractals
    ;;
  versions)
    for dir in .bench-versions/*/ .; do
      label=$([ "$dir" = . ] && echo "working tree" || cat "$dir/LABEL")
      # one CuPy kernel cache per old version: its key ignores included headers, so two versions with the same
      # .cu files and options but another common.cuh would share a cubin (the tree's own options carry a
      # header digest, so it keeps the usual cache and the kernels stage's builds)
      cache="${CUPY_CACHE_DIR:-${HOME:-/root}/.cupy/kernel_cache}"
      [ "$dir" = . ] || cache="/tmp/cupy-cache/$(basename "$dir")"
      # shellcheck disable=SC2086 # VERSION_ARGS: extra options, word-split on purpose
      CUPY_CACHE_DIR="$cache" PYTHONPATH="/tmp/site:$dir" \
        python3 benchmarks/render_throughput.py --device cuda --profile \
        --recipes "${VERSION_RECIPES:-anderson,fractal4ad}" --repeats 10 --label "$label" ${VERSION_ARGS:-} 2>&1 \
        | tee -a "$out/versions.jsonl"
    done
    python3 benchmarks/summarise.py "$out/versions.jsonl" | tee "$out/versions.md"
    ;;
  mandelbulb)
    python3 -m pytest -q -m gpu tests/fractal_pretrain/test_mandelbulb.py 2>&1 | tee "$out/gpu-tests.log"
    for mode in on_the_fly view_bank; do
      python3 benchmarks/render_throughput.py --device cuda --profile --recipes mandelbulbvar,multimandelbulb \
        --repeats 5 --set mode=$mode 2>&1 | tee -a "$out/render.jsonl"
    done
    for mode in view_bank on_the_fly; do
      python3 benchmarks/train_throughput.py --archs wide_resnet50_2 --recipe mandelbulbvar --steps 15 --warmup 5 \
        --set mode=$mode 2>&1 | tee -a "$out/train.jsonl"
    done
    python3 benchmarks/train_throughput.py --archs wide_resnet50_2 --recipe multimandelbulb --steps 15 --warmup 5 \
      --set mode=view_bank 2>&1 | tee -a "$out/train.jsonl"
    python3 benchmarks/summarise.py "$out/render.jsonl" "$out/train.jsonl" | tee "$out/summary.md"
    ;;
  ofdb)
    python3 -m pytest -q -m gpu tests/fractal_pretrain/test_ofdb.py 2>&1 | tee "$out/gpu-tests.log"
    python3 benchmarks/train_throughput.py --ofdb --archs resnet50,wide_resnet50_2 --batch 128 --size 512 \
      2>&1 | tee "$out/ofdb_train.jsonl"
    ;;
  ofdb-pretrain)
    pretrain_and_report ofdb_short_r50 Random,OFDB
    ;;
  selfsup)
    python3 -m pytest -q -m gpu tests -k "selfsup or simsiam" 2>&1 | tee "$out/gpu-tests.log"
    for batch in 512 256; do
      python3 benchmarks/train_throughput.py --simsiam --archs resnet50 --batch $batch --size 224 \
        2>&1 | tee -a "$out/simsiam.jsonl"
    done
    ;;
  adapt)
    # the backbone of `pretrain`: still there on the same warm machine, or carried in .gpu_data/short_r18/
    # (backbone.pt reassembled from the parts `pretrain` returned, and backbone.json from its archive)
    if [ ! -f runs/short_r18/backbone.pt ] && [ -f .gpu_data/short_r18/backbone.pt ]; then
      mkdir -p runs/short_r18 && cp .gpu_data/short_r18/backbone.* runs/short_r18/
    fi
    if [ ! -f runs/short_r18/backbone.pt ]; then
      echo "adapt: runs/short_r18/backbone.pt is missing: run the pretrain stage first on this machine," \
        "or carry .gpu_data/short_r18/backbone.pt and backbone.json" >&2
      exit 2
    fi
    # 1. the step's cost on wide_resnet50_2: train/prepare_s vs train/step_s
    python3 -m fractal_pretrain adapt --config jobs/adapt/short_gpu.yaml --model.backbone random \
      --model.arch wide_resnet50_2 --trainer.max_steps 200 --trainer.val_check_interval 200 --trainer.log_every_n_steps 1 \
      --trainer.enable_progress_bar false --trainer.default_root_dir runs/adapt_bench_wrn50 --ckpt_path none \
      > "$out/adapt_bench.log" 2>&1
    python3 benchmarks/adapt_step_share.py runs/adapt_bench_wrn50 | tee -a "$out/adapt_bench.log"
    # 2. the short resnet18's projector, then raw vs projected on the real samples
    python3 -m fractal_pretrain adapt --config jobs/adapt/short_gpu.yaml --trainer.enable_progress_bar false \
      --ckpt_path none > "$out/adapt.log" 2>&1
    python3 -m ad_eval grid --config jobs/eval/adapt_short_r18.yaml --cluster local \
      --out results/adapt_short_r18 > "$out/eval.log" 2>&1
    python3 -m ad_eval report --results results/adapt_short_r18 --out reports/adapt_short_r18 \
      --backbones Fractals,Fractals+adapt --control Fractals >> "$out/eval.log" 2>&1
    cat reports/adapt_short_r18/table_*.md reports/adapt_short_r18/control_*.md >> "$out/eval.log" 2>/dev/null
    tar czf "$out/adapt_short_r18.tar.gz" runs/adapt_short_r18/logs/version_*/metrics.csv \
      runs/adapt_short_r18/projector.json runs/adapt_bench_wrn50/logs/version_*/metrics.csv \
      results/adapt_short_r18 reports/adapt_short_r18
    ;;
  *)
    echo "unknown stage $stage: kernels, pretrain, versions, mandelbulb, ofdb, ofdb-pretrain, selfsup or adapt" >&2
    exit 2
    ;;
esac
