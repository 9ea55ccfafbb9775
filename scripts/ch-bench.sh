#!/usr/bin/env bash
# cloud-hypervisor, nested: vutap vs CH's own vhost_user_net and CH's built-in virtio-net
# (tap= and fd= on the macvtap), iperf3 both ways, all in one L1 run. Writes results/ch.md and
# results/ch.json. Runs tests/e2e_cloud_hypervisor.rs (which also asserts every scenario).
# SECS: iperf3 seconds per direction (default 5); REPS: rounds, medians reported (default 3). Needs root; peers as for scripts/build-l1.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/ch-bench.sh: run as root" >&2; exit 1; }
cargo build --release -p vutap
VUTAP_CH_SECS=${SECS:-5} VUTAP_CH_REPS=${REPS:-3} VUTAP_CH_RESULTS="$PWD/results" \
  cargo test --release -p vutap-tests --test e2e_cloud_hypervisor -- --nocapture
cat results/ch.md
