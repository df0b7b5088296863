#!/usr/bin/env bash
# One whole image as `generate` makes it (text tower, DPM-Solver++(2M) 20 steps with guidance
# 5, VAE decode; 512 px MicroDiT_XL_2 unless other `bench image` arguments are given) for
# microdit f32, microdit int8, PyTorch f32 and PyTorch's dynamic int8 (`quantize_dynamic` on
# the Linear layers), one cold run each under /usr/bin/time for the peak memory.
# Usage: bench/compare_generate.sh [--preset MicroDiT_Tiny_2 --resolution 256 --steps 2]
# PYTHON names an interpreter with torch, open_clip and diffusers (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
python=${PYTHON:-python3}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(grep -o -w -E 'avx512_vnni|avx512f|avx2' /proc/cpuinfo | sort -u | xargs)"
run() { echo "-- $*"; /usr/bin/time -f "peak RSS %M KiB" "$@"; }
for dtype in f32 int8; do
  run ./target/release/microdit bench image --dtype "$dtype" "$@"
  run "$python" bench/pytorch_generate.py --dtype "$dtype" "$@"
done
