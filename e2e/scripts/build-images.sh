#!/usr/bin/env bash
# Assembles the container images of restic-operator and of the cluster tier without a registry
# or a container daemon: each is an OCI layout written by umoci (Debian's `umoci`), saved as an
# OCI archive that `ctr images import` takes. Nothing is pulled from anywhere.
#
#   e2e/scripts/build-images.sh OUT_DIR COORDINATOR_BIN AGENT_BIN
#
# Writes OUT_DIR/<name>.tar and OUT_DIR/images.txt (one "<archive> <image reference>" per line):
#   ghcr.io/restic-operator/restic-operator-coordinator:<tag>  the coordinator, and nothing else
#   ghcr.io/restic-operator/restic-operator-agent:<tag>        the agent, restic, CA certificates
#   registry.k8s.io/pause:3.10.1  the pause image (holder pods, pod sandboxes), from the pause.c
#                                 of the Kubernetes source the tools were built from
#   e2e.local/busybox:1.35        a tiny app image: Debian's busybox-static
#   e2e.local/sqlite:3            busybox and Debian's sqlite3: a real database for dump tests
# The binaries are copied with the shared libraries `ldd` names (glibc only, for ours), stripped
# of debug information. <tag> is $IMAGE_TAG, default 0.1.0 (the chart's appVersion).
set -euo pipefail

out=${1:?usage: build-images.sh OUT_DIR COORDINATOR_BIN AGENT_BIN}
coordinator=${2:?coordinator binary}
agent=${3:?agent binary}
tag=${IMAGE_TAG:-0.1.0}
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
source "$here/versions.env"
cache=${RESTIC_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/restic-operator}
bin="$cache/bin"

for t in umoci gcc strip busybox sqlite3; do
  command -v "$t" >/dev/null || { echo "[build-images] $t is missing (e2e/scripts/install-deps.sh installs it)" >&2; exit 1; }
done
[ -x /bin/busybox ] && file_busybox=/bin/busybox || file_busybox=$(command -v busybox)
ldd "$file_busybox" >/dev/null 2>&1 && { echo "[build-images] $file_busybox is not static: install busybox-static" >&2; exit 1; }

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# copy_binary SRC ROOTFS DEST: the binary, stripped, and every library ldd names, at their paths.
copy_binary() {
  local src=$1 root=$2 dest=$3
  mkdir -p "$root$(dirname "$dest")"
  cp "$src" "$root$dest"
  strip --strip-debug "$root$dest"
  ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done || true
}

# image NAME REF ROOTFS_FN CONFIG_ARGS...: builds an image whose root is filled by ROOTFS_FN.
image() {
  local name=$1 ref=$2 fill=$3
  shift 3
  local layout="$work/$name" bundle="$work/$name.bundle"
  umoci init --layout "$layout"
  umoci new --image "$layout:$name"
  umoci unpack --image "$layout:$name" "$bundle" >/dev/null
  "$fill" "$bundle/rootfs"
  umoci repack --image "$layout:$name" "$bundle"
  umoci config --image "$layout:$name" --os linux --architecture "$(go env GOARCH 2>/dev/null || echo amd64)" "$@"
  # Only the final reference: extra tags umoci leaves confuse the CRI's image lookup.
  umoci tag --image "$layout:$name" "${ref##*:}"
  umoci rm --image "$layout:$name"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$out/$name.tar" .
  echo "$out/$name.tar ${ref}" >>"$work/images.txt"
  echo "[build-images] $ref ($(du -h "$out/$name.tar" | cut -f1))" >&2
}

base_etc() {
  local root=$1
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
}

fill_coordinator() {
  base_etc "$1"
  copy_binary "$coordinator" "$1" /usr/local/bin/restic-coordinator
}

fill_agent() {
  base_etc "$1"
  copy_binary "$agent" "$1" /usr/local/bin/restic-agent
  cp "$bin/restic" "$1/usr/local/bin/restic"
  # Repositories on public S3 endpoints need the public CAs.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$1/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"
  fi
}

fill_pause() {
  local src
  src=$(find "${GOMODCACHE:-$(go env GOMODCACHE)}/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux" -name pause.c | head -1)
  [ -n "$src" ] || { echo "[build-images] pause.c of Kubernetes $K8S_VERSION is not in the Go module cache (install-tools.sh puts it there)" >&2; exit 1; }
  gcc -Os -static -Wall -Werror -DVERSION=v3.10.1-restic-operator-e2e -o "$1/pause" "$src"
  strip "$1/pause"
}

fill_busybox() {
  mkdir -p "$1/bin" "$1/tmp" "$1/etc"
  cp "$file_busybox" "$1/bin/busybox"
  for applet in $("$file_busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$1/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$1/etc/passwd"
  printf 'root:x:0:\n' >"$1/etc/group"
}

fill_sqlite() {
  fill_busybox "$1"
  copy_binary "$(command -v sqlite3)" "$1" /usr/bin/sqlite3
}

image coordinator "ghcr.io/restic-operator/restic-operator-coordinator:$tag" fill_coordinator \
  --config.entrypoint /usr/local/bin/restic-coordinator --config.user 65532:65532
image agent "ghcr.io/restic-operator/restic-operator-agent:$tag" fill_agent \
  --config.entrypoint /usr/local/bin/restic-agent --config.cmd serve
image pause "registry.k8s.io/pause:3.10.1" fill_pause \
  --config.entrypoint /pause --config.user 65535:65535
image busybox "e2e.local/busybox:1.35" fill_busybox \
  --config.entrypoint /bin/sh
image sqlite "e2e.local/sqlite:3" fill_sqlite \
  --config.entrypoint /bin/sh
mv "$work/images.txt" "$out/images.txt"
