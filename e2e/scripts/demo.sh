#!/usr/bin/env bash
# The README's first command: runs the system for real on this machine. Installs what it needs,
# starts a local Kubernetes control plane and S3 server, installs the CRDs and the samples, then
# runs the coordinator and a node agent: a demo app is backed up on a manual trigger and its
# snapshot restored and compared with the volume.
# Pass --exit to tear everything down after showing the result instead of staying up.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash e2e/scripts/install-deps.sh
bash e2e/scripts/install-tools.sh >/dev/null
cargo build --quiet --locked -p restic-operator-coordinator -p restic-operator-agent -p restic-operator-e2e --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/devenv" up --coordinator "$target_dir/debug/restic-coordinator" --agent "$target_dir/debug/restic-agent" "$@"
