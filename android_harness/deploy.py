"""``deploy``: probe, build, push, install offline, enroll on the device, start the service; and the verbs that
act on a deployment afterwards (status, logs, start, stop, undeploy, push of files).

Order of :func:`deploy` (nothing is written to the device before step 4; a failure in 4-6 removes what this
run wrote, so a fresh target is left as it was and an upgraded one keeps its running version):

1. probe the target (``android_harness.probe``) and refuse it early: Python < 3.11, the coordinator
   unreachable from the device, too little memory;
2. build a wheel of this fedmoe checkout and the wheelhouse of the first extra whose wheels exist for the
   device's platform (``device``: ONNX Runtime training, x86-64 only; then ``device-lite`` where fedmoe has it),
   unless ``--extra`` names one; refuse a device with too little disk for it;
3. a one-time enrollment token from the coordinator's registry (as ``fedmoe-coord enroll`` makes), unless
   the device is enrolled already (re-deploy) or ``--token`` is given;
4. upload one tar (wheels, generated scripts, data, pre-staged bundles) and install it into ``venv.new``
   with pip from its wheel, ``--no-index`` (no index needed on the device);
5. enroll with the new runtime on the device: it generates its Ed25519 key there, so the key never leaves it;
6. stop the running version, swap the venv in, install the scripts and the service, start it, and wait until
   the runtime authenticates with the coordinator.
"""

from __future__ import annotations

import io
import json
import shlex
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from android_harness import termux
from android_harness.errors import DeployError
from android_harness.probe import TargetInfo, check_disk, check_target, probe
from android_harness.remote import (
    START_MARKER,
    Layout,
    boot_name,
    run_script,
    supervisor_scripts,
    systemd_scripts,
    systemd_unit,
    unit_name,
)
from android_harness.targets import Target
from android_harness.wheelhouse import Platform, build_runtime_wheel, extra_requirements, wheel_metadata, wheelhouse
from device_runtime.units import MIB

q = shlex.quote
MIN_MEMORY_MIB = 256  # Python + ONNX Runtime + a tiny bundle; a real bundle needs the budget the planner sizes
EXTRAS = ("device", "device-lite")  # tried in this order: first-order (ORT training) before forward-only
INSTALL_FACTOR = 3  # peak disk / upload size: tar + its unpacked copy, then wheels + venv (venv 89 MiB from 65.5 MiB)
AUTH_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class DeployOptions:
    """What ``fedmoe-android deploy`` was asked for.

    Attributes:
        coordinator: URL the device uses (``ws://HOST:PORT``). name: the device's name at the coordinator.
        data: local JSONL file pushed to the device; device_data: a JSONL path already on the device.
        memory_mib: the budget the device reports (MiB; None: memory available at each start).
        threads: ORT threads (None: one per core). extra: fedmoe extra to install (None: choose).
        service: "auto", "systemd" or "supervisor". bundles: local bundle directories to pre-stage.
        token: an enrollment token made elsewhere; coord_config: the coordinator's TOML (to make one).
    """

    coordinator: str
    name: str
    python: str = "python3"
    remote_dir: str = "~/.fedmoe"
    data: Path | None = None
    device_data: str | None = None
    memory_mib: int | None = None
    threads: int | None = None
    extra: str | None = None
    service: str = "auto"
    bundles: tuple[Path, ...] = ()
    token: str | None = None
    coord_config: Path | None = None
    token_ttl_s: float = 900.0
    cache: Path | None = None


@dataclass
class DeployReport:
    """What deploy did: the probe's findings, the extra and service chosen, payload size (bytes), timings (s)."""

    info: TargetInfo
    extra: str
    service: str
    version: str
    upgraded: bool
    enrolled: bool
    payload_bytes: int
    seconds: dict = field(default_factory=dict)


def deploy(target: Target, opts: DeployOptions, *, say=print) -> DeployReport:
    """Deploy or upgrade the runtime on ``target`` (see the module docstring for the steps).

    Raises:
        DeployError: any step failed; the message names the next step, and what this run wrote is removed.
    """
    from export.loading import cache_dir

    started = time.monotonic()
    if target.kind == "adb":
        termux.prepare(target, say=say)
    info = probe(target, python=opts.python, root=opts.remote_dir, coordinator=opts.coordinator)
    check_target(info, target, coordinator=opts.coordinator, memory_mib=opts.memory_mib or MIN_MEMORY_MIB)
    upgraded = info.deployed is not None
    if not upgraded and info.root_entries:
        raise DeployError(
            f"{info.root} on {target.spec} exists and is not a fedmoe deployment; pass an empty or new --remote-dir"
        )
    if not upgraded and opts.data is None and opts.device_data is None:
        raise DeployError(
            "a first deploy needs training data: --data FILE (pushed) or --device-data PATH (on the device)"
        )
    say(
        f"{target.spec}: Python {info.python} on {info.arch}, {info.memory_available_mib} MiB memory available, "
        f"{info.free_disk_mib} MiB disk free" + (f", upgrading {info.deployed.get('version')}" if upgraded else "")
    )
    layout = Layout(info.root)
    seconds = {"probe": time.monotonic() - started}
    with tempfile.TemporaryDirectory(prefix="fedmoe-deploy-") as tmp:
        tmp = Path(tmp)
        wheel = build_runtime_wheel(tmp / "dist")
        if info.termux:
            extra, house, reqs = termux.EXTRA, None, termux.requirements(wheel, info.platform)
        else:
            extra, house = choose_extra(wheel, info.platform, opts.extra, opts.cache or cache_dir(), say=say)
            reqs = None
        service = choose_service(info, opts.service)
        version = wheel_metadata(wheel)["version"]
        record = {
            "name": opts.name,
            "coordinator": opts.coordinator,
            "extra": extra,
            "version": version,
            "service": service,
            "data": _data_path(layout, opts, info),
            "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        payload = build_payload(tmp / "incoming.tar", wheel, house, layout, opts, record)
        size = payload.stat().st_size
        check_disk(info, target, disk_mib=INSTALL_FACTOR * size // MIB + 64)
        seconds["build"] = time.monotonic() - started - seconds["probe"]
        token = None if info.credentials else (opts.token or enroll_token(opts))
        try:
            _step(seconds, "upload", lambda: upload(target, layout, payload))
            _step(seconds, "install", lambda: install(target, layout, info, wheel.name, extra, reqs))
            if token is not None:
                _step(seconds, "enroll", lambda: enroll(target, layout, opts, token))
        except BaseException:
            remove_partial(target, layout, fresh=not upgraded, root_existed=info.root_exists)
            raise
    _step(seconds, "switch", lambda: switch(target, layout, opts.name))
    say(f"installed fedmoe {version} [{extra}] under {info.root}; service: {service}")
    _step(seconds, "start", lambda: wait_authenticated(target, layout))
    return DeployReport(info, extra, service, version, upgraded, token is not None, size, seconds)


def _step(seconds: dict, name: str, action) -> None:
    start = time.monotonic()
    action()
    seconds[name] = time.monotonic() - start


def _data_path(layout: Layout, opts: DeployOptions, info: TargetInfo) -> str:
    if opts.data is not None:
        return layout.data
    if opts.device_data is not None:
        return opts.device_data
    return info.deployed["data"]


def choose_extra(wheel: Path, platform: Platform, wanted: str | None, cache: Path, *, say=print) -> tuple[str, Path]:
    """The first extra (``wanted``, else :data:`EXTRAS` that the wheel has) whose wheels all exist for
    ``platform``, and its wheelhouse.

    Raises:
        DeployError: none has wheels for the platform (each extra's reason in the message).
    """
    have = wheel_metadata(wheel)["extras"]
    candidates = [wanted] if wanted else [e for e in EXTRAS if e in have]
    reasons = []
    for extra in candidates:
        try:
            house = wheelhouse(extra_requirements(wheel, extra, platform), platform, cache)
        except DeployError as exc:
            reasons.append(f"[{extra}] {exc}")
            continue
        say(f"backend extra: {extra} (wheelhouse {house})")
        return extra, house
    raise DeployError(
        f"no fedmoe extra installs on Python {platform.python} / {platform.arch}: "
        + "; ".join(reasons)
        + ". The ONNX Runtime training wheels exist for x86-64 only; an aarch64 device needs the "
        "forward-only `device-lite` extra (fedmoe with the device backend registry)"
    )


def choose_service(info: TargetInfo, wanted: str) -> str:
    """``systemd`` (a user unit) where the device has a systemd user session, else ``supervisor`` (a
    nohup'ed restart loop with a pidfile); on Termux ``termux-boot``: the supervisor with a wake lock, started
    at boot by a Termux:Boot script.

    Raises:
        DeployError: ``systemd`` asked for on a device without a systemd user session.
    """
    if wanted == "systemd" and not info.systemd_user:
        raise DeployError(
            "the device has no systemd user session (`systemctl --user` fails); use --service "
            "supervisor, or log in once and run `sudo loginctl enable-linger USER` there"
        )
    if info.termux:
        return "termux-boot"
    if wanted == "auto":
        return "systemd" if info.systemd_user else "supervisor"
    return wanted


def build_payload(
    out: Path, wheel: Path, house: Path | None, layout: Layout, opts: DeployOptions, record: dict
) -> Path:
    """One tar: ``wheels/`` (the wheelhouse, if any, and fedmoe's wheel), ``files/`` (scripts, deploy.json, a unit),
    ``data.jsonl`` and ``bundles/<shape_key_id>/`` (verified here first)."""
    from device_runtime.bundle import load_bundle

    with tarfile.open(out, "w") as tar:
        for path in [*(house.glob("*.whl") if house else ()), wheel]:
            tar.add(path, f"wheels/{path.name}")
        for name, text in service_files(layout, opts, record).items():
            _add_text(tar, f"files/{name}", text)
        if opts.data is not None:
            tar.add(opts.data, "data.jsonl")
        for bundle_dir in opts.bundles:
            bundle = load_bundle(bundle_dir)  # raises BundleError if it does not verify
            tar.add(bundle_dir, f"bundles/{bundle.manifest.shape_key.id}")
    return out


def service_files(layout: Layout, opts: DeployOptions, record: dict) -> dict[str, str]:
    """``run.sh``, ``deploy.json`` and the service's scripts (and its systemd unit) for ``record``."""
    files = {
        "run.sh": run_script(
            layout, url=opts.coordinator, data=record["data"], memory_mib=opts.memory_mib, threads=opts.threads
        ),
        "deploy.json": json.dumps(record, indent=2) + "\n",
    }
    if record["service"] == "systemd":
        files.update(systemd_scripts(unit_name(opts.name), layout.log))
        files["unit"] = systemd_unit(layout, opts.name)
    else:
        files.update(supervisor_scripts(layout, boot_script=record["service"] == "termux-boot"))
    return files


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o755 if name.endswith(".sh") else 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def enroll_token(opts: DeployOptions) -> str:
    """A single-use token for ``opts.name`` from the coordinator's registry (``fedmoe-coord enroll``).

    Raises:
        DeployError: neither --token nor a readable coordinator config.
    """
    if opts.coord_config is None or not Path(opts.coord_config).is_file():
        raise DeployError(
            f"no enrollment token: pass --coord-config with the coordinator's TOML (it was "
            f"{opts.coord_config}), or make a token with `fedmoe-coord enroll --name {opts.name}` and "
            "pass it in $FEDMOE_ENROLL_TOKEN"
        )
    from coordinator.config import load_config
    from coordinator.registry import Registry

    registry = Registry(load_config(opts.coord_config).registry_url)
    try:
        return registry.create_enroll_token(opts.name, opts.token_ttl_s)
    finally:
        registry.close()


def _remote(target: Target, script: str, what: str, *, input: bytes | None = None, timeout: float = 900) -> str:
    result = target.run(script, input=input, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join((result.stderr.strip() or result.stdout.strip()).splitlines()[-8:])
        raise DeployError(f"{target.spec}: {what} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def upload(target: Target, layout: Layout, payload: Path) -> None:
    """Copy the payload tar to the device and unpack it into ``incoming/``."""
    _remote(target, f"mkdir -p {q(layout.root)} && chmod 700 {q(layout.root)}", "creating the deployment directory")
    target.put(payload, f"{layout.root}/incoming.tar")
    _remote(
        target,
        f"cd {q(layout.root)} && rm -rf incoming && mkdir incoming && tar -xf incoming.tar -C incoming "
        "&& rm -f incoming.tar",
        "unpacking the upload",
    )


def install(
    target: Target, layout: Layout, info: TargetInfo, wheel_name: str, extra: str, termux_reqs: list[str] | None = None
) -> None:
    """A fresh ``venv.new`` (``--without-pip``; pip runs from its wheel, ignoring the device's pip config) with
    ``fedmoe[extra]`` from ``incoming/wheels`` only; then import the runtime's CLI once. On Termux
    (``termux_reqs`` given) see ``android_harness.termux``."""
    if termux_reqs is not None:
        _remote(
            target,
            termux.install_script(layout.root, info.python_path, wheel_name, termux_reqs),
            f"installing fedmoe[{extra}] over Termux's packages (pip needs the phone online)",
        )
        return
    pip = 'PIP_CONFIG_FILE=/dev/null venv.new/bin/python "$(ls incoming/wheels/pip-*.whl | head -n 1)"/pip --isolated'
    _remote(
        target,
        f"""set -e
cd {q(layout.root)}
rm -rf venv.new
{q(info.python_path)} -m venv --without-pip venv.new
{pip} install --quiet --no-compile --no-index --find-links incoming/wheels \\
    --no-warn-script-location --disable-pip-version-check {q(f"incoming/wheels/{wheel_name}[{extra}]")}
venv.new/bin/python -c 'import device_runtime.cli'
""",
        f"installing fedmoe[{extra}] into a venv",
    )


def enroll(target: Target, layout: Layout, opts: DeployOptions, token: str) -> None:
    """``fedmoe-device enroll`` on the device with the new venv; the token travels on stdin (never in argv)."""
    args = ["enroll", opts.coordinator, "--name", opts.name]
    if opts.memory_mib is not None:
        args += ["--memory-mib", str(opts.memory_mib)]
    _remote(
        target,
        f"IFS= read -r FEDMOE_ENROLL_TOKEN; export FEDMOE_ENROLL_TOKEN; "
        f"FEDMOE_DEVICE_HOME={q(layout.home)} exec {q(layout.venv_new)}/bin/python -m device_runtime.cli "
        + " ".join(q(a) for a in args),
        f"enrolling {opts.name} with the coordinator at {opts.coordinator}",
        input=(token + "\n").encode(),
        timeout=180,
    )


def remove_partial(target: Target, layout: Layout, *, fresh: bool, root_existed: bool) -> None:
    """Undo an unfinished deploy: a fresh one removes everything it wrote; an upgrade only its new venv and upload."""
    r = q(layout.root)
    if fresh and not root_existed:
        script = f"rm -rf {r}"
    elif fresh:
        script = f"find {r} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +"
    else:
        script = f"rm -rf {r}/venv.new {r}/incoming {r}/incoming.tar"
    target.run(script, timeout=120)


def switch(target: Target, layout: Layout, name: str) -> None:
    """Stop the running version, swap ``venv.new`` in, install scripts, data, bundles and service; start it."""
    r, unit, boot = q(layout.root), q(unit_name(name)), q(boot_name(name))
    _remote(
        target,
        f"""set -e
cd {r}
[ -f stop.sh ] && sh stop.sh
rm -rf venv.old
[ -d venv ] && mv venv venv.old
mv venv.new venv
rm -rf venv.old
mkdir -p home models
chmod 700 home
if [ -f incoming/files/unit ]; then
    mkdir -p "$HOME/.config/systemd/user"
    mv incoming/files/unit "$HOME/.config/systemd/user/"{unit}
fi
if [ -f incoming/files/boot.sh ]; then
    mkdir -p "$HOME/.termux/boot"
    mv incoming/files/boot.sh "$HOME/.termux/boot/"{boot}
fi
rm -f supervise.sh
mv incoming/files/* .
[ -f incoming/data.jsonl ] && mv incoming/data.jsonl data.jsonl
if [ -d incoming/bundles ]; then
    mkdir -p home/state/bundles
    for b in incoming/bundles/*; do
        id=$(basename "$b")
        rm -rf "home/state/bundles/.tmp-$id" "home/state/bundles/$id"
        mv "$b" "home/state/bundles/.tmp-$id"
        mv "home/state/bundles/.tmp-$id" "home/state/bundles/$id"
    done
fi
rm -rf incoming
sh start.sh
""",
        "switching to the new version",
    )


def wait_authenticated(target: Target, layout: Layout, timeout: float = AUTH_TIMEOUT_S) -> None:
    """Wait until the runtime started last (after start.sh's marker line in the log) authenticates.

    Raises:
        DeployError: the service stopped, or no authentication within ``timeout`` seconds (with the log's tail).
    """
    count = (
        f"awk '/^{START_MARKER}/ {{n = 0}} /authenticated as/ {{n++}} END {{print n + 0}}' {q(layout.log)} 2>/dev/null"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = target.run(
            f"cd {q(layout.root)} && {{ sh running.sh && echo running || echo stopped; }}; {count}", timeout=60
        )
        state, _, authenticated = result.stdout.strip().partition("\n")
        if state != "running":
            raise DeployError(
                f"{target.spec}: the runtime is installed but not running:\n{tail(target, layout)}\n"
                "fix what the log says, then `fedmoe-android start`"
            )
        if authenticated.strip() not in ("", "0"):
            return
        time.sleep(1.0)
    raise DeployError(
        f"{target.spec}: the runtime runs but did not authenticate within {timeout:.0f} s:\n{tail(target, layout)}"
    )


def tail(target: Target, layout: Layout, lines: int = 15) -> str:
    """The last ``lines`` lines of the device's log."""
    return target.run(f"tail -n {lines} {q(layout.log)} 2>/dev/null; true", timeout=60).stdout.rstrip()
