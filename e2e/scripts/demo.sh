#!/usr/bin/env bash
# The README's first command: runs the system for real on this machine. Installs what it needs,
# starts a local Kubernetes control plane and S3 server, installs the CRDs and the samples.
# Pass --exit to tear everything down after showing the result instead of staying up.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash e2e/scripts/install-deps.sh
bash e2e/scripts/install-tools.sh >/dev/null
cargo run --quiet --locked -p restic-operator-e2e --bin devenv -- up "$@"
