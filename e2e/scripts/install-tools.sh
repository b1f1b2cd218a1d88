#!/usr/bin/env bash
# Installs every binary the tests, benchmarks and the demo need into a cache outside the
# repository, building each from the Go module proxy at the version pinned in e2e/versions.env.
# A warm cache is detected per tool by a stamp file and skipped in well under a second.
#
#   e2e/scripts/install-tools.sh            # install what is missing, print the bin dir
#   RESTIC_OPERATOR_CACHE=/path ...          # cache location (default ~/.cache/restic-operator)
#
# Nothing here downloads from anywhere but the Go module proxy (and, for apt, Debian).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
source "$here/versions.env"
cache=${RESTIC_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/restic-operator}
bin="$cache/bin"
mkdir -p "$bin" "$cache/tools"

log() { printf '[install-tools] %s\n' "$*" >&2; }

# Some Go toolchains refuse to build from a module cache they cannot write; keep the defaults
# but make sure a proxy is configured (CI environments sometimes export GOPROXY=off).
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
[ "$GOPROXY" = off ] && export GOPROXY=https://proxy.golang.org,direct
export CGO_ENABLED=0

need_go() {
  command -v go >/dev/null || { log "go is required to build the test infrastructure"; exit 1; }
}

# stamp NAME VERSION -> path of the stamp that marks a finished install of that version
stamp() { echo "$cache/tools/$1-$2.done"; }

# link NAME VERSION BINARY...: expose the versioned binaries under $bin
link() {
  local dir="$cache/tools/$1-$2"
  shift 2
  for b in "$@"; do ln -sfn "$dir/$b" "$bin/$b"; done
}

install_kubernetes() {
  local v=$K8S_VERSION st; st=$(stamp kubernetes "$v")
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
  if [ ! -f "$st" ]; then
    need_go
    log "building Kubernetes $v from the Go module proxy (cold: ~15 min on 2 cores)"
    local w="$cache/src/kubernetes-$v" out="$cache/tools/kubernetes-$v"
    mkdir -p "$w" "$out"
    # k8s.io/kubernetes replaces its staging modules with local paths, so `go install` refuses
    # it. A wrapper module requires it and replaces each staging module with its published
    # v0.x.y twin instead; the list is read from the published go.mod so it stays exact.
    local gomod staging="v0${v#v1}"
    gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$v" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module restic-operator.local/kubernetes-build"
      grep -E '^go [0-9]' "$gomod"
      grep -E '^godebug ' "$gomod" || true
      echo "require k8s.io/kubernetes $v"
      sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+) => \./staging/.*#replace \1 => \1 '"$staging"'#p' "$gomod"
    } >"$w/go.mod"
    # A blank import pins every main package into the module graph so `go mod tidy` keeps them.
    {
      echo "//go:build tools"
      echo "package tools"
      echo "import ("
      echo '  _ "k8s.io/kubernetes/cmd/kube-apiserver"'
      echo '  _ "k8s.io/kubernetes/cmd/kube-controller-manager"'
      echo '  _ "k8s.io/kubernetes/cmd/kube-scheduler"'
      echo '  _ "k8s.io/kubernetes/cmd/kubelet"'
      echo '  _ "k8s.io/kubernetes/cmd/kube-proxy"'
      echo '  _ "k8s.io/kubernetes/cmd/kubectl"'
      echo ")"
    } >"$w/tools.go"
    (cd "$w" && go mod tidy -e >/dev/null 2>&1 || go mod tidy)
    local date ld
    date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$v" | cut -d. -f2)"
      ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    (cd "$w" && go build -trimpath -tags selinux,notest -ldflags "$ld" -o "$out/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
    touch "$st"
  fi
  link kubernetes "$v" "${bins[@]}"
}

install_etcd() {
  local v=$ETCD_VERSION st; st=$(stamp etcd "$v")
  if [ ! -f "$st" ]; then
    need_go
    log "building etcd $v from the Go module proxy"
    local w="$cache/src/etcd-$v" out="$cache/tools/etcd-$v"
    mkdir -p "$w" "$out"
    cat >"$w/main.go" <<'GO'
// The etcd server binary, built from the published server module (etcd's own main package
// lives in a module whose go.mod replaces its siblings with local paths).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    printf 'module restic-operator.local/etcd-build\n\ngo 1.23\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$v" >"$w/go.mod"
    (cd "$w" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$out/etcd" .)
    touch "$st"
  fi
  link etcd "$v" etcd
}

# go_install NAME VERSION MODULE PACKAGE BINARY [LDFLAGS]
# Builds PACKAGE from a wrapper module that requires MODULE@VERSION. (`go install pkg@v` would
# be shorter, but it also asks the proxy for the module's version list, which the proxy refuses
# for some modules, restic among them.)
go_install() {
  local name=$1 v=$2 mod=$3 pkg=$4 binary=$5 ld=${6:-} st
  st=$(stamp "$name" "$v")
  if [ ! -f "$st" ]; then
    need_go
    log "building $name $v from the Go module proxy"
    local w="$cache/src/$name-$v" out="$cache/tools/$name-$v"
    mkdir -p "$w" "$out"
    printf 'module restic-operator.local/%s-build\n\ngo 1.23\n\nrequire %s %s\n' "$name" "$mod" "$v" >"$w/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$w/tools.go"
    (cd "$w" && go mod tidy && go build -trimpath -ldflags "-s -w $ld" -o "$out/$binary" "$pkg")
    touch "$st"
  fi
  link "$name" "$v" "$binary"
}

# The sandbox probe (e2e/probe): our own test program, static, stamped by its source's hash.
install_probe() {
  local v st
  v=$(cat "$here/probe/go.mod" "$here/probe/main.go" | sha256sum | cut -c1-12)
  st=$(stamp sandbox-probe "$v")
  if [ ! -f "$st" ]; then
    need_go
    log "building the sandbox probe"
    local out="$cache/tools/sandbox-probe-$v"
    mkdir -p "$out"
    (cd "$here/probe" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out/sandbox-probe" .)
    touch "$st"
  fi
  link sandbox-probe "$v" sandbox-probe
}

install_all() {
  go_install restic "$RESTIC_VERSION" github.com/restic/restic \
    github.com/restic/restic/cmd/restic restic
  go_install versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw \
    github.com/versity/versitygw/cmd/versitygw versitygw "-X main.Version=$VERSITYGW_VERSION"
  go_install helm "$HELM_VERSION" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm helm \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  go_install grpcurl "$GRPCURL_VERSION" github.com/fullstorydev/grpcurl \
    github.com/fullstorydev/grpcurl/cmd/grpcurl grpcurl "-X main.version=$GRPCURL_VERSION"
  install_etcd
  install_kubernetes
  install_probe
}

case "${1:-all}" in
  all) install_all ;;
  kubernetes) install_kubernetes ;;
  etcd) install_etcd ;;
  probe) install_probe ;;
  *) log "unknown target $1"; exit 2 ;;
esac
echo "$bin"
