#!/usr/bin/env bash
# Sets up what the tests need and runs every test: formatting and lints, the
# loom model of the ring protocol and a check that it fails when the commit
# marker is stored Relaxed (a model that cannot fail proves nothing), then
# the services (PostgreSQL, Redis, Apache Pulsar: scripts/services.sh) and
# the workspace's unit, integration and doc tests, some against them.
#
# Usage: scripts/test.sh            (from anywhere; needs cargo on PATH)
# Env:   CARGO_TARGET_DIR           (optional; a cache kept between runs)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install Rust (rustup) first" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-$PWD/target}
step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "loom model of the ring protocol (writer + tethered and untethered readers, capacity 4)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$target/loom" \
    cargo test -p tickwire-proto --release --test loom_ring

step "loom model must fail with a Relaxed commit marker"
mutant_log=$(mktemp)
if RUSTFLAGS="--cfg loom --cfg tickwire_mutant_relaxed_stamp" CARGO_TARGET_DIR="$target/loom-mutant" \
    cargo test -p tickwire-proto --release --test loom_ring -- no_torn_frame_even_when_lapped >"$mutant_log" 2>&1; then
    cat "$mutant_log"
    echo "test.sh: the loom model passed with a Relaxed commit marker: it cannot catch that bug" >&2
    exit 1
fi
if ! grep -q "torn frame delivered" "$mutant_log"; then
    cat "$mutant_log"
    echo "test.sh: the mutant failed, but not on a torn frame" >&2
    exit 1
fi
echo "ok: the Relaxed-stamp mutant delivers a torn frame and the model fails on it"
rm -f "$mutant_log"

step "build the tests"
cargo test --workspace --release --no-run

step "services (PostgreSQL, Redis, Apache Pulsar on 127.0.0.1)"
scripts/services.sh up

step "workspace tests (unit, integration, doc)"
# --no-fail-fast: every test binary runs even when an earlier one failed, so
# one failure never hides the others; the script still fails at the end.
test_log=$(mktemp)
status=0
cargo test --workspace --release --no-fail-fast 2>&1 | tee "$test_log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$test_log"
if [ "$status" -ne 0 ]; then
    grep -E '^(test .* FAILED|error: .*test)' "$test_log" | sort -u >&2 || true
    echo "test.sh: some tests failed (cargo test exited $status)" >&2
fi
rm -f "$test_log"
exit "$status"
