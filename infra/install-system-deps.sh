#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the native stack and its tests need, if any is missing.
# Usage: infra/install-system-deps.sh [extra-package ...]
set -o errexit -o nounset -o pipefail

# redis-tools: redis-cli, which creates the test clusters (`--cluster create`).
packages=(redis-server redis-tools nginx openssl ca-certificates "$@")
commands=(redis-server redis-cli nginx openssl)

missing=()
for cmd in "${commands[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Debian splits venv/ensurepip out of python3.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  packages+=(python3-venv)
  missing+=(python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "installing system packages (missing: ${missing[*]})" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "run as root or install sudo: need ${packages[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
exec $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
