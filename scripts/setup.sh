#!/usr/bin/env bash
# Installs what building and testing lakewriter needs on a fresh Debian machine
# with the Rust toolchain: clang/libclang (RocksDB bindings), protoc, curl (the
# benchmark scripts), and a Python venv (.venv) for the Python tests. Idempotent; sourced by the other scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
for pkg in clang libclang-dev protobuf-compiler python3-venv curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${need_apt[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lakewriter-target}"

setup_venv() {
  local venv="$root/.venv" req="$root/tests/python/requirements.txt" stamp
  stamp="$venv/.requirements.sha"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  local inputs=("$req") want
  [ -f "$root/clients/python/pyproject.toml" ] && inputs+=("$root/clients/python/pyproject.toml")
  want="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    if [ -f "$root/clients/python/pyproject.toml" ]; then
      "$venv/bin/pip" install -q --disable-pip-version-check -e "$root/clients/python"
    fi
    echo "$want" > "$stamp"
  fi
}
