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
