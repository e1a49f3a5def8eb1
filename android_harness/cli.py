"""``fedmoe-android``: deploy the device runtime to a Raspberry Pi (ssh) or an Android phone with Termux (adb).

\b
Typical flow (the coordinator runs on this workstation, `fedmoe-coord serve`):
  fedmoe-android deploy ssh:pi@192.168.1.20 --coordinator ws://192.168.1.10:8765 --name pi-kitchen \\
      --config coord.toml --data kitchen.jsonl
  fedmoe-android status ssh:pi@192.168.1.20
  fedmoe-android logs ssh:pi@192.168.1.20 --follow
  fedmoe-android push-model ssh:pi@192.168.1.20 phone-model/   # from `fedmoe-coord model export --format pte`
  fedmoe-android undeploy ssh:pi@192.168.1.20

\b
TARGET is ssh:USER@HOST[:PORT] (keys only: install yours with ssh-copy-id first) or adb:SERIAL (a phone with a
debuggable Termux; serials from `adb devices`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from android_harness import control
from android_harness.deploy import DeployOptions, deploy
from android_harness.targets import parse_target
from device_runtime.auth import DEVICE_NAME_RULE, check_device_name
from device_runtime.cli_errors import run_cli
from device_runtime.errors import ConfigError

console = Console(stderr=True)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _target_options(func):
    """TARGET plus the options every verb takes: how to reach it and where the deployment lives."""

    @click.argument("target_spec", metavar="TARGET")
    @click.option(
        "-i",
        "--identity",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="ssh: private key file (ssh -i) [default: your ssh config / agent].",
    )
    @click.option(
        "-F",
        "--ssh-config",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="ssh: config file (ssh -F) [default: ~/.ssh/config].",
    )
    @click.option(
        "--remote-dir",
        default="~/.fedmoe",
        show_default=True,
        help="The deployment's directory on the device (venv, credentials, cache, log).",
    )
    @functools.wraps(func)
    def wrapper(target_spec, identity, ssh_config, remote_dir, **kwargs):
        target = parse_target(target_spec, identity=identity, ssh_config=ssh_config)
        return func(target=target, remote_dir=remote_dir, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Deploy and control the fedmoe device runtime on a Raspberry Pi / Linux box (ssh) or Android (adb)."""


def _device_name(value: str) -> str:
    try:
        return check_device_name(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command(name="deploy")
@_target_options
@click.option(
    "--coordinator",
    required=True,
    metavar="URL",
    help="The coordinator as the DEVICE reaches it, ws://HOST:PORT or wss://HOST:PORT (checked from the "
    "device before anything is installed).",
)
@click.option(
    "--name",
    required=True,
    callback=lambda ctx, param, value: _device_name(value),
    help=f"The device's name at the coordinator ({DEVICE_NAME_RULE}).",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Local JSONL training data to copy to the device (ROOT/data.jsonl).",
)
@click.option("--device-data", metavar="PATH", help="JSONL training data already on the device (instead of --data).")
@click.option(
    "--memory-mib",
    type=click.IntRange(min=1),
    help="Memory budget the device reports (MiB; the coordinator sizes its expert subset from it); "
    "checked against the device's available memory [default: available memory at each start].",
)
@click.option(
    "--threads", type=click.IntRange(min=1), help="ONNX Runtime threads on the device [default: one per core]."
)
@click.option(
    "--config",
    "coord_config",
    default="fedmoe-coord.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The coordinator's TOML config: its registry makes the one-time enrollment token.",
)
@click.option(
    "--token",
    envvar="FEDMOE_ENROLL_TOKEN",
    show_envvar=True,
    help="An enrollment token from `fedmoe-coord enroll` instead of --config (coordinator elsewhere).",
)
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A graph bundle directory (fedmoe-export bundle) to pre-stage in the device's bundle cache, so "
    "a slow link does not download it in the first round. Repeatable.",
)
@click.option(
    "--extra",
    help="fedmoe extra to install [default: `device` (ONNX Runtime training) if its wheels exist "
    "for the device, else `device-lite`].",
)
@click.option(
    "--service",
    type=click.Choice(["auto", "systemd", "supervisor"]),
    default="auto",
    show_default=True,
    help="systemd: a user unit; supervisor: a nohup'ed restart loop with a pidfile; auto: systemd where "
    "the device has a systemd user session.",
)
@click.option("--python", default="python3", show_default=True, help="The device's Python (>= 3.11) for the venv.")
def deploy_command(
    target,
    remote_dir,
    coordinator,
    name,
    data,
    device_data,
    memory_mib,
    threads,
    coord_config,
    token,
    bundles,
    extra,
    service,
    python,
):
    """Install (or upgrade in place) the runtime on TARGET, enroll it and start it as a service.

    \b
    1. probe: architecture, Python, free memory and disk, service manager, whether the device reaches the
       coordinator (a refused target gets an error naming the fix; nothing is written)
    2. build a wheel of fedmoe and a wheelhouse for the device's platform here (cached in $FEDMOE_CACHE)
    3. upload, install into a new venv offline (pip --no-index), enroll ON the device (its key never
       leaves it), swap the venv in, start the service and wait until it authenticates

    Re-running deploy upgrades in place: credentials, cached bundles and pending updates are kept. A failed
    first deploy removes what it wrote; a failed upgrade keeps the running version.
    """
    opts = DeployOptions(
        coordinator=coordinator,
        name=name,
        python=python,
        remote_dir=remote_dir,
        data=data,
        device_data=device_data,
        memory_mib=memory_mib,
        threads=threads,
        extra=extra,
        service=service,
        bundles=tuple(bundles),
        token=token,
        coord_config=coord_config,
    )
    report = deploy(target, opts, say=_say)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    _say(
        f"{'upgraded' if report.upgraded else 'deployed'} {name} on {target.spec}: fedmoe {report.version} "
        f"[{report.extra}], {report.service} service, "
        f"{'enrolled now' if report.enrolled else 'credentials kept'}; upload "
        f"{report.payload_bytes / 2**20:.1f} MiB; {steps}"
    )


@main.command(name="status")
@_target_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status_command(target, remote_dir, as_json):
    """Show the deployment on TARGET: runtime version, backend, service state, last round, peak RSS, pending updates.

    The last round and its peak RSS (MiB, the runtime's VmHWM) come from the last update the device sent;
    pending updates are those the coordinator has not acknowledged yet (they are re-sent on reconnect).
    """
    import json

    st = control.status(target, control.resolve_layout(target, remote_dir))
    if as_json:
        click.echo(json.dumps(asdict(st), indent=2))
        return
    table = Table("field", "value", title=f"{st.name} on {target.spec}")
    for key, value in asdict(st).items():
        table.add_row(key, ", ".join(value) if isinstance(value, tuple) else "" if value is None else str(value))
    Console().print(table)


@main.command(name="logs")
@_target_options
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(min=0), help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def logs_command(target, remote_dir, lines, follow):
    """Print the runtime's log on TARGET (ROOT/device.log)."""
    layout = control.resolve_layout(target, remote_dir)
    control.deployment(target, layout)
    command = control.logs_command(layout, lines, follow)
    if not follow:
        click.echo(target.run(command, timeout=120).stdout, nl=False)
        return
    process = target.stream(command)
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()


@main.command(name="stop")
@_target_options
def stop_command(target, remote_dir):
    """Stop the runtime on TARGET (SIGTERM: it keeps its cache and pending updates; SIGKILL after 30 s)."""
    control.stop(target, control.resolve_layout(target, remote_dir))
    console.print(f"stopped the runtime on {target.spec}")


@main.command(name="start")
@_target_options
def start_command(target, remote_dir):
    """Start the runtime on TARGET again and wait until it authenticates with the coordinator."""
    control.start(target, control.resolve_layout(target, remote_dir))
    console.print(f"started the runtime on {target.spec}; it authenticated with the coordinator")


@main.command(name="undeploy")
@_target_options
@click.confirmation_option(
    prompt="Remove the runtime, its credentials, cache and pending updates from the device?",
    help="Do not ask for confirmation.",
)
def undeploy_command(target, remote_dir):
    """Stop and remove everything deploy put on TARGET: service, venv, credentials, cache, pending updates, log.

    The coordinator still knows the device: revoke it there with `fedmoe-coord devices revoke ID`.
    """
    device_id = control.undeploy(target, control.resolve_layout(target, remote_dir))
    console.print(
        f"removed the deployment from {target.spec}"
        + (f"; revoke it at the coordinator: fedmoe-coord devices revoke {device_id}" if device_id else "")
    )


@main.command(name="push-model")
@_target_options
@click.argument("export_dir", metavar="DIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
def push_model_command(target, remote_dir, export_dir):
    """Copy an ExecuTorch export DIR (model.pte, tokenizer.json, pte.json) to TARGET's ROOT/models/<DIR name>/.

    Write DIR on the coordinator's workstation with `fedmoe-coord model export --format pte DIR` (add
    --experts-per-layer C for the subset a device class holds); an app on the device runs it with ExecuTorch.
    """
    paths = control.push_model(target, control.resolve_layout(target, remote_dir), export_dir)
    console.print(f"copied to {target.spec}: " + ", ".join(paths))


def run() -> None:
    """Entry point: a FedmoeError (DeployError, ...) is one line and exit status 1."""
    run_cli(main, console)


if __name__ == "__main__":
    run()
