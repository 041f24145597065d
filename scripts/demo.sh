#!/usr/bin/env bash
# The main job on a local default: list recipes, render a preview grid on the CPU, export a few
# WebDataset shards. Later issues extend it with pre-training and evaluation.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-env.sh

FP=.venv/bin/fractal-pretrain
mkdir -p outputs

echo "== fractal-pretrain recipes"
"$FP" recipes

echo "== fractal-pretrain render (16 anderson fractals, 256 px, CPU)"
"$FP" render --recipe anderson --num 16 --seed 0 --size 256 --device cpu \
    --out outputs/preview_anderson.png

echo "== fractal-pretrain export (64 samples, 128 px, 32 per shard)"
"$FP" export --recipe anderson --num 64 --seed 0 --size 128 \
    --out outputs/shards --shard-size 32

echo
echo "Outputs:"
echo "  preview grid: $(pwd)/outputs/preview_anderson.png"
echo "  shards:       $(pwd)/outputs/shards/ (shard-*.tar, manifest.json)"
