#!/usr/bin/env bash
# First-use setup for `make demo` / `make test`: system packages (when root), the virtual
# environment, and the project installed into it. Safe to re-run; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# System data the bench world renders from: colour emoji, their Unicode groups, fonts.
DEB_PACKAGES="fonts-noto-color-emoji unicode-data fonts-dejavu-core fonts-liberation fonts-freefont-ttf"
missing=""
for pkg in $DEB_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages:$missing"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "[setup] WARNING: missing Debian packages:$missing" >&2
    echo "[setup] the bench-world corpus needs them; run as root or: sudo apt-get install$missing" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

# On machines without CUDA pin the CPU build of torch (a wheel of it lies on local disk here);
# an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC="${FEWSTEP_TORCH_SPEC:-}"
if [ -z "$TORCH_SPEC" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    TORCH_SPEC="torch"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
stamp="$VENV/.fewstep-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing fewstep and its dependencies (first run: about 2 minutes)"
  constraints="$(mktemp)"
  echo "$TORCH_SPEC" | grep -q '==' && echo "$TORCH_SPEC" > "$constraints" || : > "$constraints"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" -c "$constraints"
  "$VENV/bin/pip" install -q -e ".[dev]" -c "$constraints"
  rm -f "$constraints"
  echo "$want" > "$stamp"
fi
