"""Round-time benchmark: run the main job (``coordinator.cli simulate``) and say where each round's time goes.

    python bench/bench_round.py --rounds 2 --out /tmp/bench-round/after --json /tmp/bench-round/after.json
    python bench/bench_round.py --repo /work/main --rounds 2 --out /tmp/bench-round/before --json before.json
    python bench/bench_round.py --compare before.json after.json
    python bench/bench_round.py --rounds 2 --profile-round 2 --profile-device laptop-4   # + py-spy profiles

It runs ``python -m coordinator.cli simulate --preset P --rounds N --seed S --out OUT`` with the code of ``--repo``
(``PYTHONPATH`` and working directory; default: this checkout) and, while it runs, samples every descendant
process from ``/proc`` (user and kernel CPU seconds, minor page faults, ``/proc/<pid>/io`` write_bytes), grouped
as the coordinator, the devices and the simulating process. Afterwards it reads:

* the registry (``OUT/<strategy>/state/registry.db``, SQLite): each round's start and end, and the bytes each
  device moved up and down (the coordinator counts every frame);
* the ``timing phase=...`` lines of the coordinator's and the devices' logs (``device_runtime.timing``): the
  seconds of each phase (device: open_bundle, slot_wait, load, evaluate, train, collect, encode_update,
  store_update, send_update, install_bundle; coordinator: plan, bundle_ensure, build_assignment, encode, send,
  send_bundle, decode, validate_update, store_update, aggregate, evaluate), summed over processes. A code
  version without these lines (before this bench existed) shows only the process counters.

Round r's window runs from the end of round r-1 (round 1: the start of round 1) to its own end, so the windows
tile the run and work that overlaps rounds (the coordinator's evaluation of version r during round r+1) counts
where it happens. Totals cover the whole run, exactly: ``getrusage(RUSAGE_CHILDREN)`` of this process
(``ru_oublock`` x 512 = bytes written). With ``--profile-round R`` it runs ``py-spy record`` (``pip install
"fedmoe[bench]"``) on the coordinator and on ``--profile-device`` for round R's window and prints the share of
samples per category (train, evaluate, serialise, hash, copy, write, tls/socket, aggregate, other).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_runtime.timing import PATTERN  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
ROLES = ("coordinator", "devices", "simulate")
COUNTERS = ("user_s", "sys_s", "minflt", "write_bytes")


@dataclass
class Proc:
    """One process's counters at its latest sample."""

    role: str
    name: str
    user_s: float = 0.0
    sys_s: float = 0.0
    minflt: int = 0
    write_bytes: int = 0


def _read_proc(pid: int) -> tuple[int, dict[str, float]] | None:
    """``(ppid, counters)`` of ``pid`` from ``/proc``, or None (it ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    values = {line.split(":")[0]: int(line.split()[1]) for line in io.splitlines() if ":" in line}
    return int(fields[1]), {
        "user_s": int(fields[11]) / TICK,
        "sys_s": int(fields[12]) / TICK,
        "minflt": int(fields[7]),
        "write_bytes": values.get("write_bytes", 0),
    }


def _role(pid: int, root: int) -> tuple[str, str]:
    """(role, name) of a descendant: the coordinator, a device (named by its home directory) or other."""
    if pid == root:
        return "simulate", "simulate"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "other", str(pid)
    words = [a.decode(errors="replace") for a in argv]
    joined = " ".join(words)
    if "serve" in words and ("coordinator.cli" in joined or "fedmoe-coord" in joined):
        return "coordinator", "coordinator"
    if "run" in words and ("device_runtime.cli" in joined or "fedmoe-device" in joined):
        home = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"FEDMOE_DEVICE_HOME=")), b"")
        return "devices", Path(home.decode()).name or str(pid)
    return "other", str(pid)


class Sampler(threading.Thread):
    """Samples the process tree under ``root`` every ``interval_s`` seconds: a time series of per-role sums."""

    def __init__(self, root: int, interval_s: float):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.procs: dict[int, Proc] = {}
        self.series: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_s)
        self.sample()

    def sample(self) -> None:
        now, parents, counters = time.time(), {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (read := _read_proc(int(entry))) is not None:
                parents[int(entry)], counters[int(entry)] = read
        for pid in counters:
            ancestor = pid
            while ancestor not in (self.root, 0, 1) and ancestor in parents:
                ancestor = parents[ancestor]
            if ancestor != self.root:
                continue
            if pid not in self.procs:
                self.procs[pid] = Proc(*_role(pid, self.root))
            for key, value in counters[pid].items():
                setattr(self.procs[pid], key, value)
        sums: dict[str, dict[str, float]] = {role: dict.fromkeys(COUNTERS, 0.0) for role in (*ROLES, "other")}
        for proc in self.procs.values():  # ended processes keep their last sample
            for key in COUNTERS:
                sums[proc.role][key] += getattr(proc, key)
        self.series.append((now, sums))

    def at(self, when: float) -> dict[str, dict[str, float]]:
        """The per-role sums of the last sample at or before ``when`` (the first sample if none)."""
        best = self.series[0][1]
        for t, sums in self.series:
            if t > when:
                break
            best = sums
        return best


@dataclass
class Round:
    number: int
    start: float
    end: float
    wall_s: float
    bytes_up: int = 0
    bytes_down: int = 0
    accuracy: float | None = None
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


def _epoch(text: str) -> float:
    """A registry timestamp (naive UTC) as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def read_rounds(registry: Path) -> list[Round]:
    """Finished rounds from the registry: windows, bytes moved, the coordinator's accuracy."""
    db = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "select id, started_at, finished_at from rounds where status = 'finished' order by id"
        ).fetchall()
        moved = defaultdict(int)
        for round_id, name, value in db.execute(
            "select round_id, name, value from metrics "
            "where device_id is not null and name in ('bytes_up', 'bytes_down')"
        ):
            moved[(round_id, name)] += int(value)
        accuracy = dict(
            db.execute("select round_id, value from metrics where device_id is null and name = 'eval_accuracy'")
        )
    finally:
        db.close()
    rounds, previous_end = [], None
    for round_id, started, finished in rows:
        start, end = _epoch(started), _epoch(finished)
        window_start = start if previous_end is None else previous_end
        rounds.append(
            Round(
                round_id,
                window_start,
                end,
                end - start,
                moved[(round_id, "bytes_up")],
                moved[(round_id, "bytes_down")],
                accuracy.get(round_id),
            )
        )
        previous_end = end
    return rounds


def read_timings(out: Path) -> list[tuple[float, str, str, float]]:
    """``(epoch, side, phase, seconds)`` of every timing line in the run's logs (side: coordinator / device)."""
    found = []
    logs = [("coordinator", p) for p in out.glob("*/coordinator.log")]
    logs += [("device", p) for p in out.glob("*/devices/*/device.log")]
    for side, path in logs:
        for line in path.read_text(errors="replace").splitlines():
            stamp, timing = LOG_LINE.match(line), PATTERN.search(line)
            if stamp and timing:
                when = time.mktime(time.strptime(stamp.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
                when += int(stamp.group(1)[20:]) / 1000
                found.append((when, side, timing.group("phase"), float(timing.group("seconds"))))
    return found


def attribute(rounds: list[Round], timings: list, sampler: Sampler) -> None:
    """Fill each round's phase seconds (by the timestamp of each line) and process counter deltas."""
    for r in rounds:
        for when, side, phase, seconds in timings:
            if r.start < when <= r.end:
                key = f"{side}.{phase}"
                r.phases[key] = r.phases.get(key, 0.0) + seconds
        before, after = sampler.at(r.start), sampler.at(r.end)
        r.counters = {role: {k: after[role][k] - before[role][k] for k in COUNTERS} for role in ROLES}


# ------------------------------------------------------------------------------------------------ profiling

WHOLE_STACK = (  # a stack with one of these frames anywhere is that phase, whatever its leaf does
    ("evaluate", re.compile(r"evaluate_received|Evaluator|score \(|evaluate \(")),
    ("aggregate", re.compile(r"aggregate")),
)
LEAF_FIRST = (  # else the first frame from the leaf up that matches decides
    ("hash", re.compile(r"sha256|hashlib|verify_files|_payload \(|put \(coordinator/tensor_store")),
    ("write", re.compile(r"atomic_write|fsync|_write_files|write_bytes")),
    ("serialise", re.compile(r"tensors_to_bytes|bytes_to_tensors|safetensors|encode \(|decode \(|msgspec")),
    ("tls/socket", re.compile(r"ssl|sslproto|selector_events|websockets|transport")),
    ("copy", re.compile(r"slice_assignment|to_float32|assignment_tensors|wire_tensors|_take_rows|asarray")),
    ("train", re.compile(r"onnxruntime|ort_trainer|trainer\.py|fit \(")),
)


def classify(stack: str) -> str:
    """The category of one collapsed stack (``frame;frame;...``, root first)."""
    frames = stack.split(";")
    for name, pattern in WHOLE_STACK:
        if any(pattern.search(frame) for frame in frames):
            return name
    for frame in reversed(frames):
        for name, pattern in LEAF_FIRST:
            if pattern.search(frame):
                return name
    return "other"


def profile_breakdown(raw: Path) -> dict[str, int]:
    """Samples per category of a ``py-spy record --format raw`` file (collapsed stacks, ``stack count``)."""
    counts: dict[str, int] = defaultdict(int)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[classify(stack)] += int(count)
    return dict(counts)


class Profiler:
    """``py-spy record`` of the coordinator and one device during one round's window."""

    def __init__(self, sampler: Sampler, out: Path, round_number: int, device: str, rate: int):
        self.sampler, self.out, self.round, self.device, self.rate = sampler, out, round_number, device, rate
        self.children: dict[str, subprocess.Popen] = {}

    def poll(self, registry: Path | None) -> None:
        """Start the recorders when the round starts, stop them when it ends."""
        if registry is None or not registry.is_file():
            return
        try:
            db = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
            row = db.execute("select status from rounds where id = ?", (self.round,)).fetchone()
            db.close()
        except sqlite3.Error:
            return
        if row is not None and not self.children and row[0] == "running":
            self.start()
        elif row is not None and row[0] != "running" and self.children:
            self.finish()

    def start(self) -> None:
        targets = {p.name: pid for pid, p in self.sampler.procs.items() if p.role in ("coordinator", "devices")}
        for name in ("coordinator", self.device):
            if name in targets:
                path = self.out / f"profile-{name}.txt"
                self.children[name] = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(targets[name]), "--rate", str(self.rate), "--format", "raw"]
                    + ["--output", str(path), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )

    def finish(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in self.children.values():
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()

    def report(self) -> dict[str, dict[str, int]]:
        return {
            name: profile_breakdown(self.out / f"profile-{name}.txt")
            for name in self.children
            if (self.out / f"profile-{name}.txt").is_file()
        }


# ------------------------------------------------------------------------------------------------ run + report


def run(args: argparse.Namespace) -> dict:
    repo = Path(args.repo).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "coordinator.cli", "simulate", "--preset", args.preset, "--seed", str(args.seed)]
    command += ["--out", str(out), "--name", out.name] + (["--rounds", str(args.rounds)] if args.rounds else [])
    env = {**os.environ, "PYTHONPATH": str(repo)}
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    usage_before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    log = open(out / "simulate.log", "w")
    child = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(child.pid, args.interval)
    sampler.start()
    profiler = (
        Profiler(sampler, out, args.profile_round, args.profile_device, args.rate) if args.profile_round else None
    )
    while child.poll() is None:
        if profiler is not None:
            registries = list(out.glob("*/state/registry.db"))
            profiler.poll(registries[0] if registries else None)
        time.sleep(0.5)
    if profiler is not None:
        profiler.finish()
    sampler.stop.set()
    sampler.join()
    log.close()
    wall = time.time() - wall
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    registries = list(out.glob("*/state/registry.db"))
    if child.returncode != 0 or not registries:
        raise SystemExit(f"simulate failed ({child.returncode}); see {out / 'simulate.log'}")
    rounds = read_rounds(registries[0])
    attribute(rounds, read_timings(out), sampler)
    user, system = usage.ru_utime - usage_before.ru_utime, usage.ru_stime - usage_before.ru_stime
    result = {
        "command": " ".join(command),
        "repo": str(repo),
        "commit": commit.stdout.strip(),
        "load_average": os.getloadavg(),
        "wall_s": wall,
        "total": {
            "user_s": user,
            "sys_s": system,
            "kernel_share": system / max(user + system, 1e-9),
            "minflt": usage.ru_minflt - usage_before.ru_minflt,
            "written_bytes": 512 * (usage.ru_oublock - usage_before.ru_oublock),
        },
        "by_role": {
            role: {k: sum(getattr(p, k) for p in sampler.procs.values() if p.role == role) for k in COUNTERS}
            for role in ROLES
        },
        "rounds": [asdict(r) for r in rounds],
    }
    if profiler is not None:
        result["profile"] = {"round": args.profile_round, "samples": profiler.report()}
    return result


def _fmt(value: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{value / scale:.{digits}f}"


def round_table(result: dict) -> list[str]:
    """Markdown: one column per round; process counters, bytes moved and phase seconds as rows."""
    rounds = result["rounds"]
    head = "| | " + " | ".join(f"round {r['number']}" for r in rounds) + " |"
    lines = [head, "|---|" + "---|" * len(rounds)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("wall s", [_fmt(r["wall_s"]) for r in rounds])
    row("accuracy", ["-" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f}%" for r in rounds])
    row("MiB up / down", [f"{r['bytes_up'] / MIB:.0f} / {r['bytes_down'] / MIB:.0f}" for r in rounds])
    for role in ("coordinator", "devices"):
        row(
            f"{role} CPU s user / kernel",
            [f"{r['counters'][role]['user_s']:.1f} / {r['counters'][role]['sys_s']:.1f}" for r in rounds],
        )
        row(f"{role} kernel share %", [_fmt(100 * _kernel_share(r["counters"][role])) for r in rounds])
        row(f"{role} minor faults (k)", [_fmt(r["counters"][role]["minflt"], 1e3, 0) for r in rounds])
        row(f"{role} MiB written", [_fmt(r["counters"][role]["write_bytes"], MIB, 0) for r in rounds])
    phases = sorted({p for r in rounds for p in r["phases"]})
    for phase in phases:
        row(f"{phase} s", [_fmt(r["phases"].get(phase, 0.0)) for r in rounds])
    return lines


def _kernel_share(counters: dict[str, float]) -> float:
    return counters["sys_s"] / max(counters["user_s"] + counters["sys_s"], 1e-9)


def summary_lines(result: dict) -> list[str]:
    total = result["total"]
    return [
        f"{result['command']}  (repo {result['repo']} @ {result['commit']})",
        f"wall {result['wall_s']:.0f} s; CPU user {total['user_s']:.0f} s, kernel {total['sys_s']:.0f} s "
        f"(kernel share {100 * total['kernel_share']:.0f}%); minor faults {total['minflt'] / 1e6:.1f} M; "
        f"written {total['written_bytes'] / MIB:.0f} MiB; load average at the end "
        + ", ".join(f"{x:.1f}" for x in result["load_average"]),
    ]


def profile_lines(result: dict) -> list[str]:
    prof = result.get("profile")
    if not prof:
        return []
    lines = [f"py-spy samples during round {prof['round']} (share of CPU samples):"]
    for name, counts in prof["samples"].items():
        total = sum(counts.values()) or 1
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {name} ({total} samples): {parts}")
    return lines


def compare_lines(before: dict, after: dict) -> list[str]:
    """Markdown: before / after per metric, totals and each round."""
    lines = ["| | before | after |", "|---|---|---|"]
    for key, label, scale in (
        ("wall_s", "wall s", 1.0),
        ("user_s", "CPU user s", 1.0),
        ("sys_s", "CPU kernel s", 1.0),
        ("kernel_share", "kernel share %", 0.01),
        ("minflt", "minor faults (M)", 1e6),
        ("written_bytes", "MiB written", MIB),
    ):
        b = before["wall_s"] if key == "wall_s" else before["total"][key]
        a = after["wall_s"] if key == "wall_s" else after["total"][key]
        lines.append(f"| {label} | {_fmt(b, scale)} | {_fmt(a, scale)} |")
    for rb, ra in zip(before["rounds"], after["rounds"]):
        n = rb["number"]
        lines.append(f"| round {n} wall s | {_fmt(rb['wall_s'])} | {_fmt(ra['wall_s'])} |")
        acc = [("-" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f}%") for r in (rb, ra)]
        lines.append(f"| round {n} accuracy | {acc[0]} | {acc[1]} |")
        for role in ("coordinator", "devices"):
            shares = [_fmt(100 * _kernel_share(r["counters"][role])) for r in (rb, ra)]
            lines.append(f"| round {n} {role} kernel share % | {shares[0]} | {shares[1]} |")
            for key, label, scale in (
                ("user_s", "CPU user s", 1.0),
                ("sys_s", "CPU kernel s", 1.0),
                ("minflt", "minor faults (k)", 1e3),
                ("write_bytes", "MiB written", MIB),
            ):
                lines.append(
                    f"| round {n} {role} {label} | {_fmt(rb['counters'][role][key], scale)} | "
                    f"{_fmt(ra['counters'][role][key], scale)} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(HERE), help="checkout whose code runs (default: this one)")
    parser.add_argument("--preset", default="default", help="simulate --preset (default or smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="simulate --rounds (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/bench-round/run", help="simulate --out (a fresh directory)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("--profile-round", type=int, default=0, help="py-spy record during this round (0: off)")
    parser.add_argument("--profile-device", default="laptop-4", help="the device profiled with the coordinator")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two results side by side")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        print("\n".join([*summary_lines(before), *summary_lines(after), "", *compare_lines(before, after)]))
        return
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("\n".join([*summary_lines(result), "", *round_table(result), "", *profile_lines(result)]))


if __name__ == "__main__":
    main()
