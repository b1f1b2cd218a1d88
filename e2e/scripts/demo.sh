#!/usr/bin/env bash
# The README's first command: runs the system for real on this machine. Installs what it needs,
# builds the images, starts a single-node Kubernetes cluster (kubelet, containerd, a CNI bridge,
# a default StorageClass) and an S3 server, installs the chart with helm, deploys a demo app
# with data on a claim, backs it up on a manual trigger, restores the snapshot with restic and
# compares it with the app's volume, then prints how to look around.
# Needs root (the node's bridge, mounts and cgroups). Pass --exit to tear everything down after
# showing the result instead of staying up.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash e2e/scripts/install-deps.sh
bash e2e/scripts/install-tools.sh >/dev/null
cargo build --quiet --locked -p restic-operator-coordinator -p restic-operator-agent -p restic-operator-e2e --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/devenv" up --coordinator "$target_dir/debug/restic-coordinator" --agent "$target_dir/debug/restic-agent" "$@"
