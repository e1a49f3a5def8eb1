"""`fedmoe-coord simulate --preset smoke --ray-address ADDR`: the device processes on a Ray cluster.

A Ray head on loopback with no CPUs (nothing is placed on it) and two worker nodes of one CPU each on this
machine; each of the smoke preset's two devices reserves one CPU, so Ray must put one on each worker. Each device
is still a real ``fedmoe-device run`` process under its memory limit, talking to the coordinator (here, in the
``simulate`` process) over websockets with mutual TLS.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "fedmoe[ray]")')
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
NODE = {"num_cpus": 1, "memory": 2 * GIB, "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(**NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        out = tmp_path_factory.mktemp("sim-ray") / "run"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "simulate", "--preset", "smoke", "--out", str(out)]
            + ["--ray-address", cluster.address],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        yield out, result.stdout, {w.node_id for w in workers}, cluster.head_node.node_id
    finally:
        cluster.shutdown()


def test_ray_smoke_rounds_complete(ray_run):
    out, stdout, _, _ = ray_run
    summary = json.loads((out / "summary.json").read_text())
    hfedmoe = summary["strategies"]["hfedmoe"]
    assert len(hfedmoe["accuracy_per_round"]) == 3  # zero-shot and the preset's 2 rounds
    for record in hfedmoe["devices_per_round"]:
        assert {d["device"] for d in record["devices"]} == {"raspberry-pi-0", "raspberry-pi-1"}
        assert all(d["bytes_up"] > 0 and d["loss"] is not None for d in record["devices"])
    assert "device placement (Ray)" in stdout


def test_ray_devices_ran_on_both_worker_nodes(ray_run):
    out, _, workers, head = ray_run
    summary = json.loads((out / "summary.json").read_text())
    nodes = summary["strategies"]["hfedmoe"]["device_nodes"]
    assert set(nodes) == {"raspberry-pi-0", "raspberry-pi-1"}
    assert {n["node_id"] for n in nodes.values()} == workers  # one device on each worker, none on the head
    assert head not in workers


def test_ray_devices_stayed_within_their_budgets_and_their_logs_came_back(ray_run):
    out, _, _, _ = ray_run
    summary = json.loads((out / "summary.json").read_text())
    peaks = summary["strategies"]["hfedmoe"]["peak_rss_mib"]
    for device, budget in summary["budgets_mib"].items():
        assert 0 < peaks[device] <= budget  # sampled on the node, under RLIMIT_DATA = the budget
        log = (out / "hfedmoe" / "devices" / device / "device.log").read_text()
        assert "authenticated as" in log and "wss://127.0.0.1" in log and "accepted" in log
