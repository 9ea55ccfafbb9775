#!/usr/bin/env bash
# The seed experiment with real guests, in one command: installs what is needed, builds
# the guest and vutap, then runs `vutap-vm seed`: internal (guest to guest through one
# bridge-mode macvtap lower) and external (guest to a peer netns behind the lower), each with the
# guest NIC served by vutap and by QEMU's tap backend side by side, QEMU 7.2 and 10.0, 1 and 2
# queue pairs, 1 and 4 iperf3 streams, both directions; plus the VEPA isolation check.
# Prints the table and writes results/seed.{md,json,svg}. About 20 minutes on a 2-core host.
# Extra arguments go to `vutap-vm seed` (e.g. --quick, --seconds 10, --qemu 10, --no-intx).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/seed.sh: run as root (it creates netns, veths and macvtaps)" >&2; exit 1; }
bash scripts/install-deps.sh
bash scripts/build-guest.sh
cargo build --release -p vutap -p vutap-bench --bins
exec target/release/vutap-vm seed "$@"
