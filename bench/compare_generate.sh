#!/usr/bin/env bash
# One guided Heun step of MicroDiT_XL_2 (what `generate` repeats 30 times per image) at 256
# and 512 px, batch 1, guidance 5, one cold run each (a step is long enough that warm-up
# matters little): microdit, then PyTorch, each under /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
run() { echo "-- $*"; /usr/bin/time -f "peak RSS %M KiB" "$@"; }
for res in 256 512; do
  args=(--preset MicroDiT_XL_2 --resolution "$res" --batch 1 --sampler-only --warmup 0 --iters 1)
  run ./target/release/microdit bench "${args[@]}"
  run python3 bench/pytorch_bench.py "${args[@]}"
done
