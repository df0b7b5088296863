#!/usr/bin/env bash
# Text encoding and VAE decoding at full size (random weights): microdit, then open_clip /
# diffusers, back to back on this machine, each under /usr/bin/time for peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
run() { echo "-- $*"; /usr/bin/time -f "peak RSS %M KiB" "$@"; }
run ./target/release/microdit bench-text --batch 8 --iters 3
run python3 bench/pytorch_frozen.py text --batch 8 --iters 3
for s in 32 64; do
  run ./target/release/microdit bench-vae --latent-size "$s" --iters 1
  run python3 bench/pytorch_frozen.py vae --latent-size "$s" --iters 1
done
