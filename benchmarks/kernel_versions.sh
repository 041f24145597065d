#!/usr/bin/env bash
# Copies the fractal_pretrain package of some commits into .bench-versions/<commit>/ (git-ignored, ~1.3 MB
# each), so that `gpu_session.sh versions` times each version's renderer side by side in one device call
# (carry .bench-versions). Run on the development machine, in the repo:
#
#   bash benchmarks/kernel_versions.sh 3bc5d92 d19c76b 5c48fc7 c295123 706e99f
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || { echo "usage: kernel_versions.sh COMMIT..." >&2; exit 2; }
rm -rf .bench-versions
for commit in "$@"; do
  short=$(git rev-parse --short "$commit")
  mkdir -p ".bench-versions/$short"
  git archive "$short" fractal_pretrain | tar -x -C ".bench-versions/$short" --exclude="*.cubin" --exclude="*.sass"
  git log -1 --format='%h %s' "$short" | cut -c1-80 > ".bench-versions/$short/LABEL"
  cat ".bench-versions/$short/LABEL"
done
du -sh .bench-versions
