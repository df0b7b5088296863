#!/usr/bin/env bash
# Text encoding, VAE decoding, precompute's decode + resize + VAE encoding and the evaluation networks at full size
# (random weights): microdit, then open_clip / pytorch-fid /
# diffusers, back to back on this machine, each under /usr/bin/time for peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
run() { echo "-- $*"; /usr/bin/time -f "peak RSS %M KiB" "$@"; }
run ./target/release/microdit bench text --batch 8 --iters 3
run python3 bench/pytorch_frozen.py text --batch 8 --iters 3
for s in 32 64; do
  run ./target/release/microdit bench vae --latent-size "$s" --iters 1
  run python3 bench/pytorch_frozen.py vae --latent-size "$s" --iters 1
done
photos=$(mktemp -d)
python3 bench/pytorch_frozen.py photos "$photos"
run ./target/release/microdit bench encode "$photos" --resolution 256 --batch 4
run python3 bench/pytorch_frozen.py encode "$photos" --resolution 256 --batch 4
rm -rf "$photos"
run ./target/release/microdit bench eval --batch 8 --iters 2
run python3 bench/pytorch_frozen.py eval --batch 8 --iters 2
