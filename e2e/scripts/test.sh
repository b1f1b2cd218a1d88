#!/usr/bin/env bash
# Runs every test of the project, installing what the tests need first. This is the README's
# test command and exactly what CI runs (.ci/run).
#   1. the pinned tools (Kubernetes, etcd, helm, restic, S3 server) into the cache, if missing;
#   2. formatting and clippy with warnings as errors;
#   3. all tests: unit tests, and integration tests against the real control plane, S3 and restic,
#      then the fault suite's table (e2e/scripts/faults.sh runs that suite alone).
set -euo pipefail
cd "$(dirname "$0")/../.."

start=$(date +%s)
bash e2e/scripts/install-deps.sh
bash e2e/scripts/install-tools.sh >/dev/null
echo "[test] tools ready after $(( $(date +%s) - start ))s"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/faults"
status=0
cargo test --workspace --locked --no-fail-fast || status=$?
echo "[test] the fault suite (coordinator/tests/faults.rs and apiserver.rs):"
bash e2e/scripts/fault-table.sh
echo "[test] all done in $(( $(date +%s) - start ))s"
exit "$status"
