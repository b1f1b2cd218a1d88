#!/usr/bin/env bash
# The fault suite alone: kills, restarts and missing parts over many repeats, then the table of
# what was measured. The test command (test.sh) runs it too, with everything else.
#   FAULT_REPEATS=3 bash e2e/scripts/faults.sh     # fewer repeats, for a quick look
set -euo pipefail
cd "$(dirname "$0")/../.."
bash e2e/scripts/install-deps.sh
bash e2e/scripts/install-tools.sh >/dev/null
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/faults"
status=0
cargo test --locked -p restic-operator-coordinator --test faults --test apiserver || status=$?
bash e2e/scripts/fault-table.sh
exit "$status"
