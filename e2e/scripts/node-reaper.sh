#!/usr/bin/env bash
# Started by the cluster tier's test support (e2e/src/node.rs) beside a node, and told to stop
# (SIGTERM, its parent-death signal) when the test process exits, however it exits. Then it
# stops what would outlive the test: containers under their shims (they outlive containerd on
# purpose), and the mounts the kubelet and containerd made under the node's directory.
#
#   node-reaper.sh NODE_DIR CGROUP_ROOT
set -u
dir=$1
cgroup_root=${2#/}

reap() {
  for _ in 1 2 3; do
    # Every process of the node's pods, in any cgroup v1 hierarchy or the v2 tree.
    find /sys/fs/cgroup/*/"$cgroup_root" /sys/fs/cgroup/"$cgroup_root" -name cgroup.procs 2>/dev/null |
      xargs -r cat 2>/dev/null | sort -u | xargs -r kill -KILL 2>/dev/null
    pgrep -f "containerd-shim.*$dir/" | xargs -r kill -KILL 2>/dev/null
    sleep 0.2
  done
  # Deepest first, lazily: nothing below the node's directory stays mounted.
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | xargs -r -n1 umount -l 2>/dev/null
  exit 0
}
trap reap TERM INT HUP
echo "watching $dir"
while :; do
  sleep 1 &
  wait $!
done
