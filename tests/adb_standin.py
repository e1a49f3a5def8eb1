"""A stand-in ``adb`` for the harness tests (no Android device or emulator can run here).

It speaks adb's argument conventions and exit codes for what the harness uses: ``adb -s SERIAL shell
COMMAND...`` (the arguments joined with spaces and run by the device's shell, stdin passed through, the
command's exit status returned, as adb's shell protocol v2 does), ``adb -s SERIAL push LOCAL REMOTE``
(``LOCAL: 1 file pushed.``), ``adb devices``; an unknown serial is ``adb: device 'X' not found`` with status 1.
The device's file system is a local folder DEVICE laid out like Android's (``DEVICE/data/local/tmp``) with
Termux in ``DEVICE/data/data/com.termux/files/{usr,home}``; absolute device paths starting with ``/data/`` are
mapped into it, in commands and push destinations. ``run-as com.termux`` runs the rest of the command (as
this user: the stand-in cannot change uid); it fails like Android's when the package is missing or
``DEVICE/not-debuggable`` exists. Commands run with an empty environment, as adbd's shell has.
Every invocation is appended to ``DEVICE/adb.log`` (one JSON list per line), so tests check the sequence.

Usage: ``python adb_standin.py DEVICE SERIAL -- ADB-ARGS...`` (tests put an ``adb`` wrapper on PATH).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TERMUX = "com.termux"
_DEVICE_PATH = re.compile(r"(?<![\w./-])/data/")


def device_path(device: Path, text: str) -> str:
    """``text`` with every absolute ``/data/...`` path mapped under ``device``."""
    return _DEVICE_PATH.sub(f"{device}/data/", text)


def shell(device: Path, args: list[str]) -> int:
    command = " ".join(args)
    if command.startswith("run-as "):
        package, _, command = command[len("run-as ") :].partition(" ")
        if package != TERMUX or not (device / "data" / "data" / TERMUX).is_dir():
            print(f"run-as: unknown package: {package}", file=sys.stderr)
            return 1
        if (device / "not-debuggable").exists():
            print(f"run-as: package not debuggable: {package}", file=sys.stderr)
            return 1
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "ANDROID_DATA": "/data"}
    return subprocess.run(["sh", "-c", device_path(device, command)], cwd=device, env=env).returncode


def push(device: Path, local: str, remote: str) -> int:
    if not os.path.isfile(local):
        print(f"adb: error: cannot stat '{local}': No such file or directory", file=sys.stderr)
        return 1
    if not remote.startswith("/data/local/tmp/"):
        print(f"adb: error: failed to copy '{local}' to '{remote}': remote Permission denied", file=sys.stderr)
        return 1
    shutil.copyfile(local, device_path(device, remote))
    print(f"{local}: 1 file pushed.")
    return 0


def main(argv: list[str]) -> int:
    device, serial, args = Path(argv[0]), argv[1], argv[3:]
    with open(device / "adb.log", "a") as log:
        log.write(json.dumps(args) + "\n")
    if args[:1] == ["devices"]:
        print(f"List of devices attached\n{serial}\tdevice\n")
        return 0
    if args[:1] != ["-s"] or len(args) < 3:
        print("adb: usage: adb -s SERIAL shell|push ...", file=sys.stderr)
        return 1
    if args[1] != serial:
        print(f"adb: device '{args[1]}' not found", file=sys.stderr)
        return 1
    verb, rest = args[2], args[3:]
    if verb == "shell":
        return shell(device, rest)
    if verb == "push" and len(rest) == 2:
        return push(device, *rest)
    print(f"adb: unknown command {verb}", file=sys.stderr)
    return 1


def make_device(root: Path, serial: str, python: str) -> tuple[Path, Path]:
    """A Termux-like DEVICE under ``root`` and an ``adb`` executable for it; returns (DEVICE, the adb path).

    Termux's ``python3`` is ``python`` (a wrapper: its site-packages play the role of Termux's python-numpy,
    python-onnxruntime, ... packages); ``pkg`` records its arguments in ``DEVICE/pkg.log`` (it cannot install
    Android packages here); ``termux-wake-lock`` records that it was called.
    """
    device = root / "device"
    prefix = device / "data" / "data" / TERMUX / "files" / "usr"
    for folder in (device / "data" / "local" / "tmp", prefix / "bin", prefix / "tmp", prefix.parent / "home"):
        folder.mkdir(parents=True)
    scripts = {
        "python3": f'#!/bin/sh\nexec {python} "$@"\n',
        "pkg": f'#!/bin/sh\necho "$*" >> {device}/pkg.log\n',
        "termux-wake-lock": f"#!/bin/sh\necho wake-lock >> {device}/wake.log\n",
    }
    scripts["python"] = scripts["python3"]
    for name, text in scripts.items():
        (prefix / "bin" / name).write_text(text)
        (prefix / "bin" / name).chmod(0o755)
    adb = root / "bin" / "adb"
    adb.parent.mkdir()
    adb.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {device} {serial} -- "$@"\n')
    adb.chmod(0o755)
    return device, adb


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
