#!/usr/bin/env bash
# Live upgrade vs plain restart, one run on one QEMU 10 guest: 10 `vutap upgrade`s under a 10 ms
# ping and iperf3 --bidir from the peer, then SIGKILL + start under the same traffic. Writes
# results/upgrade.md and results/upgrade.json (per-upgrade ping gap, iperf3 dip, frames lost,
# carrier changes). Runs tests/e2e_upgrade.rs, which also asserts every figure of the upgrades.
# Needs root and scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/upgrade-report.sh: run as root" >&2; exit 1; }
cargo build --release -p vutap
VUTAP_UPGRADE_RESULTS="$PWD/results" \
  cargo test --release -p vutap-tests --test e2e_upgrade -- --nocapture qemu10
cat results/upgrade.md
