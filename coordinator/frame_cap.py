"""How large a frame an authenticated device may send (issue 19, item 4). An Update holds at most the tensors of
an assignment the device was given (every tensor of its bundle, float32 as sent, or less: float16, fewer
tensors, or a zeroth-order update), plus its header; every other message is a header alone. So the limit of a
device's connection is sized from its assignments, not from ``max_message_mib`` alone (measured before: a
200 MiB frame from an enrolled device with no such assignment raised the server's memory by 407 MiB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from coordinator.planning import BundleStore
from device_runtime.bundle import Manifest
from device_runtime.errors import BundleError
from device_runtime.wire import MAX_HEADER_BYTES

HEADER_ROOM = 2 * MAX_HEADER_BYTES  # the message's JSON header and the safetensors header of its tensors (bytes)


def payload_bytes(manifest: Manifest) -> int:
    """Bytes of every tensor of ``manifest``'s bundle as float32: an assignment's payload, an update's largest."""
    return sum(4 * math.prod(spec.shape) for spec in manifest.tensors)


def frame_cap(bundles: BundleStore, shape_keys: Iterable[str], ceiling: int) -> int:
    """The largest frame a device given assignments of ``shape_keys`` may send (bytes): :data:`HEADER_ROOM` plus
    the largest of their payloads (bundles no longer in the cache are skipped: their updates cannot be checked
    anyway), at most ``ceiling``."""
    biggest = 0
    for key in shape_keys:
        try:
            biggest = max(biggest, payload_bytes(bundles.manifest(key)))
        except BundleError:
            continue
    return min(ceiling, HEADER_ROOM + biggest)
