import multiprocessing
import time

import pytest

from device_runtime.errors import ConfigError
from device_runtime.slots import parse_slots, training_slot


def _hold(spec, seconds, queue):
    with training_slot(spec, poll_s=0.01) as slot:
        queue.put(("in", time.monotonic(), slot))
        time.sleep(seconds)
        queue.put(("out", time.monotonic(), slot))


def test_at_most_k_holders_at_once(tmp_path):
    spec = f"{tmp_path}:2"
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_hold, args=(spec, 0.3, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    events = sorted(queue.get() for _ in range(8))
    active, peak = 0, 0
    for kind, _, _ in sorted(events, key=lambda e: (e[1], e[0] == "in")):
        active += 1 if kind == "in" else -1
        peak = max(peak, active)
    assert peak == 2
    assert {slot for kind, _, slot in events} == {0, 1}


def test_no_spec_means_no_slot_and_bad_spec_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMOE_TRAINING_SLOTS", raising=False)
    with training_slot() as slot:
        assert slot is None
    with pytest.raises(ConfigError):
        parse_slots(f"{tmp_path}:0")
    with pytest.raises(ConfigError):
        parse_slots("nodir")
