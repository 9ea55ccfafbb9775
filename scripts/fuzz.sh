#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: libFuzzer (from libfuzzer-sys) with LLVM's
# SanitizerCoverage flags set in fuzz/.cargo/config.toml, so no nightly and no cargo-fuzz.
#
#   scripts/fuzz.sh build                  # build every target
#   scripts/fuzz.sh replay                 # every target over fuzz/corpus and fuzz/regressions (CI)
#   scripts/fuzz.sh run TARGET [SECS] [libFuzzer flags...]   # fuzz; new inputs go to fuzz/corpus/TARGET
#   scripts/fuzz.sh minimize TARGET DIR... # merge DIRs into a minimal fuzz/corpus/TARGET
#
# Targets: chain_check hdr_parse features (pure, virtio/), datapath (TX/RX loops, mock tap),
# vhost_user (message sequences into serve_connection; needs root for its tap), metrics_http
# (the metrics endpoint's request parser, fed in pieces).
set -euo pipefail
self="$(realpath "$0")"
cd "$(dirname "$0")/../fuzz"
TARGETS=(chain_check hdr_parse features datapath vhost_user metrics_http)
BIN=target/x86_64-unknown-linux-gnu/release
# Connections and workers per input make vhost_user slow; 10 s is far above any normal input.
COMMON=(-timeout=10 -rss_limit_mb=2048)

build() { cargo build --release --bins; }

case "${1:-}" in
    build) build ;;
    replay)
        build
        for t in "${TARGETS[@]}"; do
            # The kept corpus plus the inputs of past findings, each executed once (inputs given as
            # files are only run, never mutated or written back); any crash or hang fails the step.
            inputs=$(find "corpus/$t" "regressions/$t" -type f 2>/dev/null | sort || true)
            [ -n "$inputs" ] || { echo "== $t: no inputs"; continue; }
            log="$(mktemp)"
            if ! echo "$inputs" | xargs "$BIN/$t" "${COMMON[@]}" >"$log" 2>&1; then
                grep -v "^Running:\|^Executed" "$log" | tail -n 40; rm -f "$log"
                echo "fuzz replay: $t failed" >&2; exit 1
            fi
            echo "== $t: $(grep -c "^Executed" "$log") inputs replayed"
            rm -f "$log"
        done
        ;;
    run)
        t="${2:?target}"; secs="${3:-600}"; shift $(( $# < 3 ? $# : 3 ))
        build
        mkdir -p "corpus/$t" "artifacts/$t"
        exec nice -n 19 "$BIN/$t" "${COMMON[@]}" -max_total_time="$secs" -artifact_prefix="artifacts/$t/" "$@" "corpus/$t"
        ;;
    minimize)
        t="${2:?target}"; shift 2
        build
        rm -rf "corpus/$t.new" && mkdir -p "corpus/$t.new" "corpus/$t"
        "$BIN/$t" "${COMMON[@]}" -merge=1 "corpus/$t.new" "corpus/$t" "$@"
        rm -rf "corpus/$t" && mv "corpus/$t.new" "corpus/$t"
        du -sh "corpus/$t"
        ;;
    *) sed -n '2,11p' "$self"; exit 2 ;;
esac
