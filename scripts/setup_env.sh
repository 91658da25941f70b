#!/usr/bin/env bash
# Creates (or refreshes) .venv with the pinned CPU stack. Idempotent: a second run with an
# unchanged setup.py only checks a stamp. torch is installed first and pinned so that no
# dependency can pull a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp="$venv/.seqpipe-stamp"
want=$(cat "$root/setup.py" "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" -e "$root[test]"
echo "$want" > "$stamp"
