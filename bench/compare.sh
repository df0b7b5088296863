#!/usr/bin/env bash
# Runs `microdit bench` and the same work in PyTorch back to back on this machine.
# Usage: bench/compare.sh [extra args for both, e.g. --preset MicroDiT_Tiny_2 --batch 4]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== microdit (burn $(grep -m1 -A1 'name = "burn"' Cargo.lock | tail -1 | cut -d'"' -f2), flex CPU backend)"
/usr/bin/time -f "peak RSS %M KiB" ./target/release/microdit bench "$@"
echo "== PyTorch"
/usr/bin/time -f "peak RSS %M KiB" python3 bench/pytorch_bench.py "$@"
