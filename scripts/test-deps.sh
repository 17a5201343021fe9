#!/usr/bin/env bash
# Everything the tests need besides Rust: the real test models (sha256-checked), the
# official Python clients (`ollama`, `openai`, `anthropic`, pytest), ollama-js (tests/clients/js),
# headless Chromium for the browser test (Debian `chromium`), qemu's user-mode emulator for the
# portable-build test (Debian `qemu-user`), and for the fleet test (tests/integration/fleet.rs)
# iproute2's `ip` (network namespaces) and nginx (Debian's, never started as a service).
# Safe to rerun: each step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-test-models.sh

if ! python3 -c 'import ollama, openai, anthropic, pytest' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check \
        'ollama>=0.6,<0.7' 'openai>=1.66' 'anthropic>=0.40' 'pytest>=8' ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
            'ollama>=0.6,<0.7' 'openai>=1.66' 'anthropic>=0.40' 'pytest>=8'
fi

missing=()
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
command -v qemu-x86_64 >/dev/null || missing+=(qemu-user)
command -v ip >/dev/null || missing+=(iproute2)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q && apt-get install -y -q "${missing[@]}"
fi
if [ ! -f tests/clients/js/node_modules/ollama/package.json ]; then
    npm ci --prefix tests/clients/js --no-audit --no-fund --silent
fi
