#!/usr/bin/env bash
# The backend benchmark: builds in release mode, then runs vutap-bench, which sets up its own
# topology (netns + veth + macvtap, plain taps, DPDK testpmd), runs every case and tears it all
# down. Markdown on stdout, results/bench.json, results/bench.svg, results/bench.md.
#   scripts/bench.sh            full run (a few minutes)
#   scripts/bench.sh --smoke    a couple of seconds: checks frames flow and a report is written
#   scripts/bench.sh --profile  the one-pair cells once more under perf: where each backend's CPU
#                               per frame goes (results/profile.{md,json,svg}); explains cells,
#                               the unprofiled run measures them
# Other arguments go to vutap-bench (--sizes, --pairs, --duration, --warmup, --no-dpdk, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root (netns, macvtap, tap)" >&2; exit 1; }
cargo build --release -p vutap -p vutap-bench --bins
mkdir -p results
if [ "${1:-}" = "--smoke" ]; then
    exec target/release/vutap-bench "$@" --json results/tmp/bench-smoke.json --svg results/tmp/bench-smoke.svg
fi
if [ "${1:-}" = "--profile" ]; then
    exec target/release/vutap-bench --pairs 1 --rounds 1 --no-latency "$@" \
        --json results/profile.json --svg results/profile.svg --markdown results/profile.md
fi
exec target/release/vutap-bench --markdown results/bench.md "$@"
