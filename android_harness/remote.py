"""The files and shell scripts a deployment keeps on the device, all under one directory ``ROOT``::

    ROOT/deploy.json        what was deployed: name, coordinator, extra, runtime version, service, data file
    ROOT/venv/              the runtime's venv (built as venv.new/, swapped in only once it installed)
    ROOT/home/              $FEDMOE_DEVICE_HOME: credentials.json (the device's key, made on the device),
                            state/bundles/ (bundle cache), state/updates/ (updates not yet acknowledged)
    ROOT/data.jsonl         the device's training data (when pushed with --data)
    ROOT/run.sh             runs ``fedmoe-device run`` with the deployment's arguments
    ROOT/start.sh, stop.sh, running.sh   the service: a systemd user unit, or a supervisor loop
    ROOT/supervise.sh, supervisor.pid    (supervisor only) restarts run.sh when it fails
    ROOT/device.log         the runtime's log (both services append to it)
    ROOT/models/            ExecuTorch programs put there by ``push-model``

Re-deploying replaces ``venv/`` and the scripts and keeps ``home/`` (credentials, cache, pending updates).
Every script here is POSIX sh (dash on Debian / Raspberry Pi OS, Termux's sh).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from android_harness.errors import DeployError

q = shlex.quote
RESTART_DELAY_S = 10
STOP_TIMEOUT_S = 30
START_MARKER = "== fedmoe-android start"  # start.sh appends it to device.log before starting


@dataclass(frozen=True)
class Layout:
    """Absolute paths of one deployment on the device (``root`` from the probe)."""

    root: str

    def __getattr__(self, name: str) -> str:
        files = {
            "venv": "venv",
            "venv_new": "venv.new",
            "home": "home",
            "incoming": "incoming",
            "log": "device.log",
            "deploy": "deploy.json",
            "data": "data.jsonl",
            "models": "models",
            "bundles": "home/state/bundles",
            "updates": "home/state/updates",
            "pid": "supervisor.pid",
        }
        if name not in files:
            raise AttributeError(name)
        return f"{self.root}/{files[name]}"


def run_script(
    layout: Layout,
    *,
    url: str,
    data: str,
    memory_mib: int | None,
    threads: int | None,
    extra_args: tuple[str, ...] = (),
) -> str:
    """``run.sh``: ``fedmoe-device run`` (as ``python -m device_runtime.cli``: the venv was built as venv.new and
    moved, which breaks console scripts' shebangs but not ``bin/python``) with the deployment's home, data, budget."""
    args = [f"{layout.venv}/bin/python", "-m", "device_runtime.cli", "run", url, "--data", data]
    if memory_mib is not None:
        args += ["--memory-mib", str(memory_mib)]
    if threads is not None:
        args += ["--threads", str(threads)]
    return (
        "#!/bin/sh\n# written by fedmoe-android deploy; re-run deploy to change it\n"
        f"export FEDMOE_DEVICE_HOME={q(layout.home)}\nexec {' '.join(q(a) for a in [*args, *extra_args])}\n"
    )


def supervisor_scripts(layout: Layout, *, boot_script: bool = False) -> dict[str, str]:
    """``supervise.sh`` (restart ``run.sh`` ``RESTART_DELAY_S`` s after a failure, forward SIGTERM to it) and
    ``start.sh`` / ``stop.sh`` / ``running.sh`` for it, for devices without a systemd user session (Termux,
    containers). ``boot_script``: also ``boot.sh`` for Termux:Boot (installed as ``~/.termux/boot/<boot_name>``),
    and start.sh takes a wake lock (Android would otherwise suspend the CPU with the screen off)."""
    r = q(layout.root)
    supervise = f"""#!/bin/sh
# written by fedmoe-android: keeps the device runtime running (no systemd user session on this device)
cd {r}
echo $$ > supervisor.pid
child=
stop_child() {{
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
    [ -n "$child" ] && wait "$child"
    rm -f supervisor.pid
    exit 0
}}
trap stop_child TERM INT
while :; do
    sh run.sh &
    child=$!
    wait "$child" && status=0 || status=$?
    child=
    [ "$status" -eq 0 ] && break
    echo "fedmoe-android supervisor: the runtime exited with status $status; restarting in {RESTART_DELAY_S} s"
    sleep {RESTART_DELAY_S}
done
rm -f supervisor.pid
"""
    running = f"""#!/bin/sh
pid=$(cat {q(layout.pid)} 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
"""
    wake = "command -v termux-wake-lock >/dev/null 2>&1 && termux-wake-lock >/dev/null 2>&1\n" if boot_script else ""
    start = f"""#!/bin/sh
cd {r}
sh running.sh && exit 0
echo "{START_MARKER} $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> device.log
{wake}if command -v setsid >/dev/null 2>&1; then
    nohup setsid sh supervise.sh </dev/null >>device.log 2>&1 &
else
    nohup sh supervise.sh </dev/null >>device.log 2>&1 &
fi
"""
    stop = f"""#!/bin/sh
cd {r}
pid=$(cat supervisor.pid 2>/dev/null) || exit 0
kill -TERM "$pid" 2>/dev/null || {{ rm -f supervisor.pid; exit 0; }}
i=0
while kill -0 "$pid" 2>/dev/null && [ $i -lt {STOP_TIMEOUT_S * 2} ]; do sleep 0.5; i=$((i + 1)); done
kill -s KILL -- -"$pid" 2>/dev/null; kill -s KILL -- "$pid" 2>/dev/null
rm -f supervisor.pid
exit 0
"""
    scripts = {"supervise.sh": supervise, "running.sh": running, "start.sh": start, "stop.sh": stop}
    if boot_script:
        scripts["boot.sh"] = (
            f"#!/data/data/com.termux/files/usr/bin/sh\n# Termux:Boot runs this at boot\nsh {r}/start.sh\n"
        )
    return scripts


def systemd_unit(layout: Layout, name: str) -> str:
    """A systemd user unit that runs ``run.sh``, restarts it on failure and appends to ``device.log``.

    Raises:
        DeployError: ``name`` or the layout's paths hold a line break or a control character.
    """
    return f"""[Unit]
Description=fedmoe device runtime ({unit_text(name)}), installed by fedmoe-android
After=network-online.target

[Service]
ExecStart=/bin/sh {unit_word(layout.root + "/run.sh")}
Restart=on-failure
RestartSec={RESTART_DELAY_S}
TimeoutStopSec={STOP_TIMEOUT_S}
StandardOutput=append:{unit_text(layout.log)}
StandardError=append:{unit_text(layout.log)}

[Install]
WantedBy=default.target
"""


def unit_text(value: str) -> str:
    """``value`` as literal text in a systemd unit setting (``%`` starts a specifier: doubled).

    Raises:
        DeployError: ``value`` holds a line break or another control character (it would end the setting).
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise DeployError(f"{value!r} holds a control character, which a systemd unit cannot hold; pick another")
    return value.replace("%", "%%")


def unit_word(value: str) -> str:
    """``value`` as one argument of a systemd ``ExecStart=`` line: double-quoted, ``\\`` and ``"`` escaped.

    Raises:
        DeployError: as :func:`unit_text`.
    """
    return '"' + unit_text(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_scripts(unit: str, log: str) -> dict[str, str]:
    """``start.sh`` / ``stop.sh`` / ``running.sh`` driving the user unit ``unit`` (lingering keeps it running
    after logout and starts it at boot: ``loginctl enable-linger``, allowed for oneself on Raspberry Pi OS)."""
    u = q(unit)
    return {
        "start.sh": f"#!/bin/sh\nsystemctl --user is-active --quiet {u} && exit 0\n"
        f'echo "{START_MARKER} $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> {q(log)}\n'
        f'loginctl enable-linger "$(id -un)" >/dev/null 2>&1\n'
        f"systemctl --user daemon-reload && systemctl --user enable --now {u}\n",
        "stop.sh": f"#!/bin/sh\nsystemctl --user stop {u} 2>/dev/null; exit 0\n",
        "running.sh": f"#!/bin/sh\nsystemctl --user is-active --quiet {u}\n",
    }


def unit_name(name: str) -> str:
    """The systemd user unit of deployment ``name``."""
    return f"fedmoe-device-{name}.service"


def boot_name(name: str) -> str:
    """The Termux:Boot script (in ``~/.termux/boot/``) of deployment ``name``."""
    return f"fedmoe-device-{name}"
