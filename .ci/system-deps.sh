#!/usr/bin/env bash
# What the test suite needs beyond pip's packages; each step is skipped when already done.
# Called by the README's test command and so by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Headless Chromium for the playground page's browser test (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# optimum-intel in its own virtualenv (it wants transformers < 5.6): tests/export exports a tiny
# transformers model to OpenVINO IR with its optimum-cli. Rebuilt when its pins change.
if ! cmp -s .ci/optimum-constraints.txt .venv-optimum/optimum-constraints.txt; then
    rm -rf .venv-optimum
    python -m venv .venv-optimum
    .venv-optimum/bin/pip install -q torch==2.13.0 "optimum-intel[openvino]==2.2.0" \
        transformers==5.5.4 openvino-tokenizers==2026.4.1 -c .ci/optimum-constraints.txt
    .venv-optimum/bin/pip uninstall -y -q torchvision  # PyPI's build breaks beside CPU torch
    cp .ci/optimum-constraints.txt .venv-optimum/optimum-constraints.txt
fi
