#!/usr/bin/env bash
# Installs the real components the tests run (containerd, ctr, the
# distribution registry, crictl, crane, helm) into .tools/bin with
# `go install`, each only when it is missing or at another version, and
# Debian's chromium package when no chromium is found. Safe to run
# repeatedly.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
export GOBIN="${GOBIN:-$root/.tools/bin}"
mkdir -p "$GOBIN"

# name|module path|version
tools=(
	"containerd|github.com/containerd/containerd/v2/cmd/containerd|v2.4.2"
	"ctr|github.com/containerd/containerd/v2/cmd/ctr|v2.4.2"
	"registry|github.com/distribution/distribution/v3/cmd/registry|v3.1.2"
	"crictl|sigs.k8s.io/cri-tools/cmd/crictl|v1.37.0"
	"crane|github.com/google/go-containerregistry/cmd/crane|v0.22.1"
	"helm|helm.sh/helm/v4/cmd/helm|v4.3.2"
)

for t in "${tools[@]}"; do
	IFS='|' read -r name pkg version <<<"$t"
	stamp="$GOBIN/.$name.version"
	if [[ -x "$GOBIN/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
		continue
	fi
	echo "install-tools: go install $pkg@$version" >&2
	start=$SECONDS
	GOFLAGS=-mod=mod CGO_ENABLED=0 go install "$pkg@$version"
	echo "$version" >"$stamp"
	echo "install-tools: $name done in $((SECONDS - start))s" >&2
done

# Debian's Chromium, for the debug page's headless browser test
if ! command -v chromium >/dev/null 2>&1 && [[ -z "${PEERMIRROR_CHROMIUM:-}" ]]; then
	if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
		echo "install-tools: apt-get install chromium" >&2
		start=$SECONDS
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
		echo "install-tools: chromium done in $((SECONDS - start))s" >&2
	else
		# only the debug page's browser test needs it; it fails with this hint
		echo "install-tools: chromium is missing: install Debian's chromium package, or set PEERMIRROR_CHROMIUM" >&2
	fi
fi
