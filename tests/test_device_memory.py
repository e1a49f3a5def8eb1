"""A device's memory accounting and care: its own peak RSS, and a heap that gives memory back."""

import subprocess
import sys

import numpy as np

from device_runtime.memory import _LIBC

CHILD = "from device_runtime.trainer import peak_rss_bytes; print(peak_rss_bytes() >> 20)"


def test_peak_rss_is_the_process_own_not_its_parents():
    ballast = np.ones(400 << 17)  # 400 MiB resident in this (parent) process when the child is forked
    child = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, preexec_fn=lambda: None
    )
    assert ballast[-1] == 1.0
    assert int(child.stdout) < 200  # ru_maxrss would say >= 400: exec keeps the forked image's mark


FRAGMENT = """
import sys, numpy as np
from device_runtime.memory import limit_heap_growth, release_memory
def vm_data_mib():
    return next(int(l.split()[1]) >> 10 for l in open("/proc/self/status") if l.startswith("VmData:"))
if sys.argv[1] == "care":
    limit_heap_growth()
np.ones(6 << 17)  # a freed 6 MiB block raises glibc's dynamic mmap threshold above 5 MiB
before, blocks, pins = vm_data_mib(), [], []
for _ in range(40):  # 5 MiB blocks interleaved with small long-lived ones, as in a round
    blocks.append(np.ones(5 << 17))
    pins.append(np.ones(1000))
grown = vm_data_mib() - before
del blocks
release_memory()
print(grown, vm_data_mib() - before)
"""


def _grown_and_kept(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True).stdout
    grown, kept = out.split()
    return int(grown), int(kept)


def test_freed_round_memory_leaves_the_data_segment():
    if _LIBC is None:
        return  # not glibc: nothing to tune
    grown, kept = _grown_and_kept("care")
    assert grown >= 190 and kept < 20
    grown, kept = _grown_and_kept("defaults")  # the failure this prevents: freed blocks stay mapped
    assert grown >= 190 and kept >= 190


STEPS = """
import resource, sys, numpy as np
from device_runtime.memory import limit_heap_growth, training_heap
def vm_data_mib():
    return next(int(l.split()[1]) >> 10 for l in open("/proc/self/status") if l.startswith("VmData:"))
def steps():  # a training step's buffers: 8 MiB each, written, freed
    for _ in range(20):
        np.ones(1 << 20)
limit_heap_growth()
before = vm_data_mib()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with training_heap() if sys.argv[1] == "window" else open("/dev/null"):
    steps()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(faults, vm_data_mib() - before)
"""


def _faults_and_kept(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    faults, kept = out.split()
    return int(faults), int(kept)


def test_training_heap_reuses_step_buffers_and_gives_them_back():
    if _LIBC is None:
        return  # not glibc: nothing to tune
    reused, kept = _faults_and_kept("window")  # one 8 MiB block faulted in once, then reused; trimmed after
    fresh, _ = _faults_and_kept("plain")  # outside the window every 8 MiB block is a fresh mapping
    assert kept < 4 and 5 * reused < fresh  # measured 977 vs 10,320 (numpy asks for huge pages where it can)


FRAMES = """
import ctypes, resource, sys
from device_runtime.memory import _LIBC, _M_TRIM_THRESHOLD, limit_heap_growth
limit_heap_growth()
if sys.argv[1] == "glibc-trim":  # the trim threshold a fixed mmap threshold leaves: glibc's 128 KiB
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # frames of 2 MiB received, read, freed (bundle chunks, websocket fragments)
    frame = bytearray(2 << 20)
    del frame
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def test_frames_under_the_mmap_threshold_reuse_the_heap():
    if _LIBC is None:
        return  # not glibc: nothing to tune

    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FRAMES, mode], capture_output=True, text=True).stdout)

    kept, trimmed = faults("device"), faults("glibc-trim")
    assert kept < 2_000 and trimmed > 40 * 400  # each 2 MiB frame is 512 pages faulted in again when trimmed
