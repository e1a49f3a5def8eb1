#!/usr/bin/env bash
# tests/test_harness_ssh.py deploys the device runtime over ssh to this machine: Debian's OpenSSH server
# (the test starts its own sshd on loopback with a test-owned config; nothing here starts a daemon), the
# ssh client, and Debian's python3 for the deployed venv (the target's Python, not the CI's).
set -euo pipefail
if command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        openssh-server openssh-client python3 python3-venv >/dev/null
fi
