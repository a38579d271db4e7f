#!/usr/bin/env bash
# Sets up .venv (pinned, verified versions) and runs one of:
#   bash scripts/bootstrap.sh demo [pseudobox demo args...]   the main job on the embedded default
#   bash scripts/bootstrap.sh test [pytest args...]           the test suite
# Idempotent: a venv whose lock stamp matches requirements.lock is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "pseudobox needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi
stamp=.venv/.pseudobox-lock-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (torch wheels are large; about 2 minutes from a local mirror)" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q -r requirements.lock 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c 'import torch, torchvision, ray, pseudobox; from torchvision.ops import nms' \
    || { echo "environment check failed" >&2; exit 1; }
  rm -f .venv/.pseudobox-lock-*
  touch "$stamp"
fi
what=${1:-}
shift || true
case "$what" in
  demo) exec .venv/bin/pseudobox demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) ;;
  *) echo "usage: bash scripts/bootstrap.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
