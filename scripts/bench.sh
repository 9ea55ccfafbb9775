#!/usr/bin/env bash
# The backend benchmark: builds in release mode, then runs vutap-bench, which sets up its own
# topology (netns + veth + macvtap, plain taps, DPDK testpmd), runs every case and tears it all
# down. Markdown on stdout, results/bench.json, results/bench.svg, results/bench.md.
#   scripts/bench.sh            full run (a few minutes)
#   scripts/bench.sh --smoke    a couple of seconds: checks frames flow and a report is written
# Other arguments go to vutap-bench (--sizes, --pairs, --duration, --warmup, --no-dpdk, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root (netns, macvtap, tap)" >&2; exit 1; }
cargo build --release -p vutap -p vutap-bench --bins
mkdir -p results
if [ "${1:-}" = "--smoke" ]; then
    exec target/release/vutap-bench "$@" --json results/tmp/bench-smoke.json --svg results/tmp/bench-smoke.svg
fi
exec target/release/vutap-bench --markdown results/bench.md "$@"
