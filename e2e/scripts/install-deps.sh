#!/usr/bin/env bash
# System packages the build and tests need, from Debian. Skips apt entirely when present.
set -euo pipefail
need=()
command -v setpriv >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v protoc >/dev/null || need+=(protobuf-compiler)   # tonic/prost code generation
# The cluster tier's node: container runtime, CNI plugins, kube-proxy's iptables, image
# assembly without a daemon, and the busybox of the demo app's image.
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)          # the node's bridge
command -v pgrep >/dev/null || need+=(procps)         # the node reaper
command -v strip >/dev/null || need+=(binutils)       # image binaries without debug info
command -v gcc >/dev/null || need+=(gcc)              # the pause image, from pause.c
command -v umoci >/dev/null || need+=(umoci)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
command -v sqlite3 >/dev/null || need+=(sqlite3)   # the database of the dump tests' image
command -v vagrant >/dev/null || need+=(vagrant)   # `vagrant validate` of the Vagrantfile
if [ ${#need[@]} -gt 0 ]; then
  echo "[install-deps] installing ${need[*]} from Debian" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
# Go builds the test infrastructure from the module proxy; Kubernetes 1.34 needs Go >= 1.24
# (a newer toolchain is fetched from the proxy by GOTOOLCHAIN=auto when the go.mod asks for it).
if ! command -v go >/dev/null; then
  echo "[install-deps] Go >= 1.21 is required to build the test infrastructure (found none)" >&2
  exit 1
fi
