#!/usr/bin/env bash
# Runs every vutap check: formatting and unused dependencies, unit tests, integration tests
# (netns, veth, macvtap, tap), the DPDK-peer frontend tests, the bench smoke run, end-to-end
# QEMU 7.2 / 10.0 guests (migration, live upgrade), libvirt, cloud-hypervisor nested in a QEMU 10
# guest, the Debian package installed in a fresh root, clippy, and the fuzz corpus replay.
# Needs root (network namespaces, macvtaps, /dev/net/tun). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (the tests create netns, veths, macvtaps and taps)" >&2; exit 1; }
bash scripts/install-deps.sh
# House rules first, they take seconds: formatting (rustfmt.toml), then no dependency that the
# code does not use (cargo-machete works on stable; cargo-udeps would need nightly).
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
command -v cargo-machete >/dev/null || cargo install --locked cargo-machete
cargo machete
bash scripts/build-guest.sh
# Release build: the end-to-end tests and the bench smoke run spawn target/release/vutap.
cargo build --release --workspace --bins
# The L1 initramfs of the nested cloud-hypervisor test (needs the release vutap and the peers
# in ../shared/peers or $VUTAP_PEERS_DIR). Without them only that test fails, so carry on.
bash scripts/build-l1.sh || echo "scripts/build-l1.sh failed: e2e_cloud_hypervisor will fail" >&2
cargo test --release --workspace --no-fail-fast "$@"
# Lints on everything the tests built (same profile, so it reuses their dependencies).
cargo clippy --release --workspace --all-targets -- -D warnings
# Fuzz regression: every fuzz target (built on stable, see scripts/fuzz.sh) over its kept corpus.
bash scripts/fuzz.sh replay
