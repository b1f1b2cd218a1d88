#!/usr/bin/env bash
# Prints the fault suite's table from the rows its tests wrote (coordinator/tests/faults.rs and apiserver.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
rows="${CARGO_TARGET_DIR:-target}/tmp/faults"
echo "| fault | repeat | must hold | measured | verdict |"
echo "| --- | --- | --- | --- | --- |"
if compgen -G "$rows/*.md" >/dev/null; then
  cat "$rows"/*.md
else
  echo "| (no row was written: the suite did not run) | | | | |"
fi
