#!/usr/bin/env bash
# The end-to-end demo: installs what is needed, builds vutap, then boots a TCG Linux guest whose
# NIC is a macvtap served by vutap, and again by QEMU's own tap backend on the same macvtap, and
# prints an iperf3 table (vutap vs QEMU tap, same run). Extra arguments go to `vutap-vm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it creates a netns, a veth pair and a macvtap)" >&2; exit 1; }
bash scripts/install-deps.sh
bash scripts/build-guest.sh
cargo build --release --workspace --bins
exec target/release/vutap-vm demo "$@"
