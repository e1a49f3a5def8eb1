"""A real OpenSSH server on loopback for the harness tests: Debian's ``/usr/sbin/sshd`` with a test-owned config,
host key and AuthorizedKeysFile, a throwaway user (created with ``useradd``, removed with ``userdel -r``) and a key
pair; plus the ssh client config that reaches it (``ssh -F``). Needs root (CI runs as root) and
``.ci/setup.d/40-sshd.sh``'s packages; the caller skips otherwise.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why the ssh tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (useradd and a second sshd); CI runs as root"
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("useradd"), "/usr/bin/python3"):
        if not tool or not os.path.exists(tool):
            return f"{tool or 'ssh / ssh-keygen / useradd'} missing: run .ci/setup.d/40-sshd.sh"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keypair(path: Path) -> Path:
    """A new passphrase-less Ed25519 key pair at ``path`` / ``path.pub``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class SshServer:
    """A running sshd: ``target`` (``ssh:USER@127.0.0.1:PORT``), ``ssh_config`` (client config with the user's key
    and the server's host key pinned), ``home`` (the user's home directory)."""

    user: str
    port: int
    home: Path
    ssh_config: Path
    process: subprocess.Popen

    @property
    def target(self) -> str:
        return f"ssh:{self.user}@127.0.0.1:{self.port}"


def start(root: Path) -> SshServer:
    """Create the user and keys under ``root`` and start sshd on a free loopback port."""
    user = f"fmt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user], check=True)
    home = Path(pwd.getpwnam(user).pw_dir)
    key, host_key = keypair(root / "id_ed25519"), keypair(root / "host_ed25519")
    authorized = home / ".ssh" / "authorized_keys"  # sshd reads it as the user: it must live where the user can
    authorized.parent.mkdir(mode=0o700)
    authorized.write_text(Path(f"{key}.pub").read_text())
    shutil.chown(authorized.parent, user, user)
    shutil.chown(authorized, user, user)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
AllowUsers {user}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {root / "sshd.pid"}
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(root / "sshd.log", "wb")
    )
    known = root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    client = root / "ssh_config"
    client.write_text(f"""Host 127.0.0.1
    IdentityFile {key}
    IdentitiesOnly yes
    UserKnownHostsFile {known}
    StrictHostKeyChecking yes
""")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}") from None
            time.sleep(0.1)
    return SshServer(user, port, home, client, process)


def stop(server: SshServer) -> None:
    """Stop sshd; end the user's leftover supervisor (by its pidfile), remove the user and its home."""
    for pidfile in server.home.glob("**/supervisor.pid"):
        try:
            os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, OSError):
            pass
    server.process.terminate()
    server.process.wait(10)
    subprocess.run(["userdel", "--remove", server.user], capture_output=True)
