#!/usr/bin/env bash
# Soak test: N minutes (default 10) of mixed traffic from the test frontend against an
# in-process vutap on a multi-queue tap, with random frontend disconnects/reconnects and tap
# flaps. Checks at the end: fd count, thread count and RSS back to their start values, no panic
# logged, TX frames handed over = sent + counted drops. CI runs the 30-second version
# (tests/soak.rs). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
SOAK_SECS=$((minutes * 60)) exec cargo test --release -p vutap-tests --test soak -- --nocapture
