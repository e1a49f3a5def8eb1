#!/usr/bin/env bash
# One apt-get update for every later setup script (they only run apt-get install).
set -euo pipefail
if command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
fi
