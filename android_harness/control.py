"""Act on an existing deployment: status, logs, start, stop, undeploy, and copying files into it.

Every verb finds the deployment by ``--remote-dir`` (default ``~/.fedmoe``) and refuses a directory without
``deploy.json`` (nothing deployed there). The runtime's state is read from the files it keeps (see
``android_harness.remote``); the device's key is never read.
"""

from __future__ import annotations

import json
import re
import shlex
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from android_harness.errors import DeployError
from android_harness.remote import Layout, boot_name, unit_name
from android_harness.targets import Target

q = shlex.quote
# The line device_runtime.client logs when it sends an update: "round %d: loss %.4f, %d steps, peak RSS %.0f MiB".
_ROUND_LINE = re.compile(r"round (\d+): loss ([0-9.]+), (\d+) steps, peak RSS (\d+) MiB")
_SEPARATOR = "=====fedmoe-android====="


def resolve_layout(target: Target, remote_dir: str) -> Layout:
    """The deployment's layout: ``remote_dir`` with ``~`` expanded on the device."""
    if remote_dir == "~" or remote_dir.startswith("~/"):
        home = target.run("cd && pwd", timeout=60).stdout.strip()
        return Layout(home + remote_dir[1:])
    if not remote_dir.startswith("/"):
        raise DeployError(f"--remote-dir {remote_dir!r} must be absolute or start with ~/")
    return Layout(remote_dir.rstrip("/"))


def deployment(target: Target, layout: Layout) -> dict:
    """The deployment's ``deploy.json``.

    Raises:
        DeployError: nothing is deployed under ``layout.root``.
    """
    result = target.run(f"cat {q(layout.deploy)}", timeout=60)
    if result.returncode != 0:
        raise DeployError(
            f"nothing is deployed under {layout.root} on {target.spec}; run `fedmoe-android deploy "
            f"{target.spec} ...` (or pass the --remote-dir it used)"
        )
    return json.loads(result.stdout)


@dataclass(frozen=True)
class Status:
    """A deployment at a glance. ``backend``: the training backend the runtime chooses (``fedmoe-device profile``),
    ``backends``: those installed. ``last_round`` / ``last_peak_rss_mib``: from the last update the runtime sent
    (None before its first round); ``pending_updates``: updates not yet acknowledged by the coordinator."""

    name: str
    coordinator: str
    version: str
    extra: str
    backend: str
    backends: tuple[str, ...]
    service: str
    running: bool
    last_round: int | None
    last_loss: float | None
    last_peak_rss_mib: int | None
    pending_updates: int
    deployed_at: str


def status(target: Target, layout: Layout) -> Status:
    """Read the deployment's record, service state, last round from its log, pending updates and backends."""
    record = deployment(target, layout)
    r = q(layout.root)
    out = target.run(
        f"""cd {r}
sh running.sh && echo running || echo stopped
echo {_SEPARATOR}
grep -E 'round [0-9]+: loss' device.log 2>/dev/null | tail -n 1
echo {_SEPARATOR}
ls home/state/updates 2>/dev/null | grep '\\.json$' | grep -vc '^acked\\.json$'
echo {_SEPARATOR}
venv/bin/python -m device_runtime.cli profile --json --benchmark-seconds 0.01 2>/dev/null
true""",
        timeout=120,
    ).stdout
    state, last, pending, profile = (part.strip() for part in out.split(_SEPARATOR))
    match = _ROUND_LINE.search(last)
    try:
        profile = json.loads(profile)
    except ValueError:  # the venv cannot start the runtime: status still shows the rest
        profile = {}
    return Status(
        name=record["name"],
        coordinator=record["coordinator"],
        version=record["version"],
        extra=record["extra"],
        backend=profile.get("backend", "?"),
        backends=tuple(profile.get("backends", ())),
        service=record["service"],
        running=state == "running",
        last_round=int(match[1]) if match else None,
        last_loss=float(match[2]) if match else None,
        last_peak_rss_mib=int(match[4]) if match else None,
        pending_updates=int(pending) if pending.isdigit() else 0,
        deployed_at=record["deployed_at"],
    )


def logs_command(layout: Layout, lines: int, follow: bool) -> str:
    """The device-side command that prints (``follow``: and keeps printing) the runtime's log."""
    return f"tail -n {int(lines)} {'-F ' if follow else ''}{q(layout.log)}"


def start(target: Target, layout: Layout) -> None:
    """Start the service (no-op if it runs) and wait until the runtime authenticates."""
    from android_harness.deploy import wait_authenticated

    deployment(target, layout)
    result = target.run(f"cd {q(layout.root)} && sh start.sh", timeout=120)
    if result.returncode != 0:
        raise DeployError(f"{target.spec}: start failed: {result.stderr.strip()}")
    wait_authenticated(target, layout)


def stop(target: Target, layout: Layout) -> None:
    """Stop the service: SIGTERM (the runtime keeps its cache and pending updates), SIGKILL after 30 s."""
    deployment(target, layout)
    result = target.run(f"cd {q(layout.root)} && sh stop.sh && ! sh running.sh", timeout=120)
    if result.returncode != 0:
        raise DeployError(
            f"{target.spec}: the runtime did not stop: {result.stderr.strip()}; run "
            f"`fedmoe-android stop {target.spec}` again"
        )


def undeploy(target: Target, layout: Layout) -> str | None:
    """Stop the service, remove its unit / boot script and the whole deployment directory (credentials too).

    Returns:
        The device id it had at the coordinator (revoke it there), or None if it never enrolled.
    """
    record = deployment(target, layout)
    r, unit = q(layout.root), q(unit_name(record["name"]))
    device_id = target.run(
        f'cd {r} && venv/bin/python -c "import json; print(json.load(open('
        f"'home/credentials.json'))['device_id'])\" 2>/dev/null",
        timeout=60,
    ).stdout.strip()
    result = target.run(
        f"""cd {r} && sh stop.sh
if [ -f "$HOME/.config/systemd/user/"{unit} ]; then
    systemctl --user disable {unit} >/dev/null 2>&1
    rm -f "$HOME/.config/systemd/user/"{unit}
    systemctl --user daemon-reload >/dev/null 2>&1
fi
rm -f "$HOME/.termux/boot/"{q(boot_name(record["name"]))}
cd / && rm -rf {r}
""",
        timeout=300,
    )
    if result.returncode != 0:
        raise DeployError(f"{target.spec}: undeploy failed: {result.stderr.strip()}; run it again")
    return device_id or None


def push_model(target: Target, layout: Layout, export_dir: Path) -> list[str]:
    """Copy an ExecuTorch export (``fedmoe-coord model export --format pte``) to ``ROOT/models/<its name>/``.

    Returns:
        The files' absolute paths on the device.

    Raises:
        DeployError: ``export_dir`` is not such an export.
    """
    from export.executorch import FORMAT, META_FILE, PTE_FILE, TOKENIZER_FILE

    names = (PTE_FILE, TOKENIZER_FILE, META_FILE)
    try:
        meta = json.loads((export_dir / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DeployError(
            f"{export_dir} is not an ExecuTorch export ({exc}); write one with `fedmoe-coord model "
            "export --format pte DIR`"
        ) from exc
    if meta.get("format") != FORMAT or not all((export_dir / n).is_file() for n in names):
        raise DeployError(f"{export_dir}: needs {', '.join(names)} of export format {FORMAT}; export it again")
    return push_files(target, layout, {n: export_dir / n for n in names}, f"models/{export_dir.resolve().name}")


def push_files(target: Target, layout: Layout, files: dict[str, Path], subdir: str) -> list[str]:
    """Copy local ``files`` (name on the device -> local path) into ``ROOT/subdir/`` in one tar.

    Returns:
        Their absolute paths on the device.
    """
    dest = f"{layout.root}/{subdir}"
    with tempfile.TemporaryDirectory(prefix="fedmoe-push-") as tmp:
        archive = Path(tmp) / "push.tar"
        with tarfile.open(archive, "w") as tar:
            for name, path in files.items():
                tar.add(path, name)
        staged = f"{layout.root}/push.tar"
        _ensure_dir(target, layout.root)
        target.put(archive, staged)
        result = target.run(
            f"mkdir -p {q(dest)} && tar -xf {q(staged)} -C {q(dest)}; s=$?; rm -f {q(staged)}; exit $s", timeout=300
        )
    if result.returncode != 0:
        raise DeployError(f"{target.spec}: unpacking into {dest} failed: {result.stderr.strip()}")
    return [f"{dest}/{name}" for name in files]


def _ensure_dir(target: Target, path: str) -> None:
    result = target.run(f"mkdir -p {q(path)}", timeout=60)
    if result.returncode != 0:
        raise DeployError(f"{target.spec}: cannot create {path}: {result.stderr.strip()}")
