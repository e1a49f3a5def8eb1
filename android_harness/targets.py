"""Where the runtime goes: ``ssh:USER@HOST[:PORT]`` (a Pi or any Linux box) or ``adb:SERIAL`` (Android + Termux).

A :class:`Target` runs POSIX ``sh`` scripts on the device and copies files to it; nothing else of the
harness knows whether ssh or adb carries them.

- ssh: the system's OpenSSH client in batch mode (keys only, never a password prompt), the user's own
  ``~/.ssh/config`` unless ``ssh_config`` is given. Host keys are checked as ssh always does: an unknown
  host is refused (connect once by hand to accept its key).
- adb: ``adb -s SERIAL shell run-as com.termux sh -c SCRIPT`` runs inside Termux's app sandbox (its uid, its
  files), which needs a debuggable Termux build (the APKs of Termux's GitHub releases; the F-Droid and Play
  builds are not debuggable). Files go through ``/data/local/tmp`` (``adb push``), then ``run-as`` copies them
  into Termux's home. The environment Termux's shell would set (``PREFIX``, ``HOME``, ``PATH``, ``TMPDIR``,
  ``LD_PRELOAD`` of termux-exec) is set explicitly, because ``run-as`` starts no login shell.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from android_harness.errors import DeployError

TERMUX_PACKAGE = "com.termux"
TERMUX_FILES = f"/data/data/{TERMUX_PACKAGE}/files"
ADB_STAGING = "/data/local/tmp"
DEFAULT_TIMEOUT_S = 600.0
_SSH_TARGET = re.compile(
    r"ssh:(?P<user>[A-Za-z0-9_.][A-Za-z0-9_.-]*)@(?P<host>[A-Za-z0-9_.:\[\]-]+?)(?::(?P<port>\d+))?"
)
_ADB_TARGET = re.compile(r"adb:(?P<serial>[A-Za-z0-9_.:-]+)")


@dataclass(frozen=True)
class Result:
    """A finished remote command: exit status, stdout and stderr (text)."""

    returncode: int
    stdout: str
    stderr: str


class Target(ABC):
    """A device reachable over ssh or adb. ``spec`` is the string it was parsed from."""

    spec: str
    kind: str

    @abstractmethod
    def command(self, script: str) -> list[str]:
        """The local argv that runs ``script`` with ``sh -c`` on the device."""

    def run(self, script: str, *, input: bytes | None = None, stdin=None, timeout: float = DEFAULT_TIMEOUT_S) -> Result:
        """Run ``script`` on the device; ``input`` (bytes) or ``stdin`` (an open file) goes to its stdin.

        Raises:
            DeployError: the transport failed (unreachable, refused key, no such device), naming the fix.
        """
        try:
            done = subprocess.run(self.command(script), input=input, stdin=stdin, capture_output=True, timeout=timeout)
        except FileNotFoundError as exc:
            raise DeployError(f"{exc.filename} is not installed on this workstation; {self.install_hint}") from exc
        except subprocess.TimeoutExpired as exc:
            raise DeployError(
                f"{self.spec}: no answer within {timeout:.0f} s; check the device is on and "
                "reachable, then run the command again"
            ) from exc
        result = Result(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
        self.check_transport(result)
        return result

    def stream(self, script: str) -> subprocess.Popen:
        """Start ``script`` on the device with its stdout streamed to ours (``logs --follow``)."""
        return subprocess.Popen(self.command(script))

    @abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Copy the local file ``local`` to the absolute device path ``remote`` (its directory exists)."""

    @abstractmethod
    def check_transport(self, result: Result) -> None:
        """Raise DeployError if ``result`` is a failure of ssh / adb itself rather than of the script."""

    install_hint = ""


@dataclass
class SshTarget(Target):
    """``ssh:USER@HOST[:PORT]``; ``identity``: a private key file (ssh ``-i``); ``ssh_config``: ssh ``-F``."""

    spec: str
    user: str
    host: str
    port: int = 22
    identity: Path | None = None
    ssh_config: Path | None = None
    kind = "ssh"
    install_hint = "install OpenSSH's client (Debian: apt install openssh-client)"

    def _base(self) -> list[str]:
        args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(self.port)]
        if self.ssh_config is not None:
            args += ["-F", str(self.ssh_config)]
        if self.identity is not None:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return [*args, f"{self.user}@{self.host}"]

    def command(self, script: str) -> list[str]:
        return [*self._base(), "sh -c " + shlex.quote(script)]

    def put(self, local: Path, remote: str) -> None:
        with open(local, "rb") as handle:
            result = self.run(f"cat > {shlex.quote(remote)}", stdin=handle)
        if result.returncode != 0:
            raise DeployError(
                f"{self.spec}: writing {remote} failed: {result.stderr.strip()}; check the free disk "
                "space on the device"
            )

    def check_transport(self, result: Result) -> None:
        if result.returncode != 255:
            return
        err = result.stderr.strip()
        where = f"{self.user}@{self.host} port {self.port}"
        if "Permission denied" in err:
            raise DeployError(
                f"{where} refused the ssh key ({err.splitlines()[-1]}); install your public key on "
                f"the device (`ssh-copy-id -p {self.port} {self.user}@{self.host}`) or pass "
                "--identity with the right private key"
            )
        if "Host key verification failed" in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
            raise DeployError(
                f"{where}: its host key is unknown or changed; connect once with `ssh -p {self.port} "
                f"{self.user}@{self.host}`, check the fingerprint and accept it"
            )
        if any(
            s in err
            for s in (
                "Connection refused",
                "timed out",
                "No route to host",
                "Could not resolve",
                "Network is unreachable",
                "Connection closed",
                "Connection reset",
            )
        ):
            raise DeployError(
                f"cannot reach {where} ({err.splitlines()[-1]}); check the address, that the device "
                "is on the network and that its ssh server runs (Raspberry Pi OS: `sudo systemctl "
                "enable --now ssh`)"
            )
        raise DeployError(f"ssh to {where} failed: {err or 'exit status 255'}")


def termux_environment() -> str:
    """``export`` lines giving a ``run-as`` shell the environment of a Termux session."""
    prefix = f"{TERMUX_FILES}/usr"
    return (
        f"export PREFIX={prefix} HOME={TERMUX_FILES}/home TMPDIR={prefix}/tmp "
        f"PATH={prefix}/bin:$PATH LANG=en_US.UTF-8; "
        f"[ -f {prefix}/lib/libtermux-exec.so ] && export LD_PRELOAD={prefix}/lib/libtermux-exec.so; "
    )


@dataclass
class AdbTarget(Target):
    """``adb:SERIAL``: the ``adb`` on PATH (or ``$FEDMOE_ADB``) drives Termux through ``run-as com.termux``."""

    spec: str
    serial: str
    kind = "adb"
    install_hint = "install Android's platform tools (Debian: apt install adb) or set $FEDMOE_ADB"

    def _adb(self) -> list[str]:
        return [os.environ.get("FEDMOE_ADB", "adb"), "-s", self.serial]

    def command(self, script: str) -> list[str]:
        inner = termux_environment() + 'cd "$HOME" && ' + script
        return [*self._adb(), "shell", f"run-as {TERMUX_PACKAGE} sh -c {shlex.quote(inner)}"]

    def put(self, local: Path, remote: str) -> None:
        staged = f"{ADB_STAGING}/fedmoe-{secrets.token_hex(4)}-{local.name}"
        try:
            done = subprocess.run([*self._adb(), "push", str(local), staged], capture_output=True, timeout=600)
        except FileNotFoundError as exc:
            raise DeployError(f"{exc.filename} is not installed on this workstation; {self.install_hint}") from exc
        self.check_transport(
            Result(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
        )
        try:
            result = self.run(f"cp {shlex.quote(staged)} {shlex.quote(remote)}")
        finally:
            subprocess.run([*self._adb(), "shell", f"rm -f {shlex.quote(staged)}"], capture_output=True, timeout=60)
        if result.returncode != 0:
            raise DeployError(f"{self.spec}: copying {local.name} into Termux failed: {result.stderr.strip()}")

    def check_transport(self, result: Result) -> None:
        text = (result.stderr + result.stdout).strip()
        if result.returncode == 0:
            return
        if "not found" in text and ("device '" in text or "no devices" in text):
            raise DeployError(
                f"adb has no device {self.serial!r} ({text.splitlines()[-1]}); plug it in, enable USB "
                "debugging and check `adb devices`"
            )
        if "unauthorized" in text:
            raise DeployError(f"{self.serial}: adb is not authorised; accept the RSA key prompt on the phone")
        if "run-as:" in text and ("not debuggable" in text or "unknown package" in text):
            raise DeployError(
                f"{self.serial}: {text.splitlines()[-1]}; install Termux from its GitHub releases (a "
                "debuggable build), or run sshd in Termux (`pkg install openssh && sshd`), `adb "
                "forward tcp:8022 tcp:8022` and deploy to ssh:USER@127.0.0.1:8022"
            )


def parse_target(spec: str, *, identity: Path | None = None, ssh_config: Path | None = None) -> Target:
    """``ssh:USER@HOST[:PORT]`` or ``adb:SERIAL`` -> a Target.

    Raises:
        DeployError: neither form.
    """
    if match := _SSH_TARGET.fullmatch(spec):
        return SshTarget(spec, match["user"], match["host"], int(match["port"] or 22), identity, ssh_config)
    if match := _ADB_TARGET.fullmatch(spec):
        return AdbTarget(spec, match["serial"])
    raise DeployError(
        f"bad target {spec!r}: use ssh:USER@HOST[:PORT] (a Pi or Linux box) or adb:SERIAL (an "
        "Android phone with Termux; serials from `adb devices`)"
    )
