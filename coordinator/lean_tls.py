"""Small TLS read buffers for idle connections (issue 22: 10,000 devices on one coordinator).

asyncio's ``SSLProtocol`` reads every TLS connection's ciphertext into its own ``bytearray`` of
``SSLProtocol.max_size`` (256 KiB), allocated when the connection starts and kept for its life: 2.5 GiB for
10,000 connected devices that send a heartbeat every 20 seconds. :func:`lean_reads` gives one connection an
adaptive buffer instead: :data:`IDLE_BYTES` while its reads are small, :data:`TRANSFER_BYTES` as soon as a read
fills the small one (an update on its way in), and small again after :data:`SHRINK_AFTER` small reads in a row.

The transfer size and the quick shrink are what a round of many devices costs: measured
(``bench/bench_connections.py``, 1000 devices, 3 rounds of 100), a full 256 KiB kept for 8 small reads (minutes
of heartbeats) by every device that had uploaded was most of the 90 MiB a coordinator's RSS grew by in the rounds.
A read of 64 KiB holds four full TLS records (16 KiB each), so a bulk transfer costs little more CPU.

This reaches into asyncio's private ``SSLProtocol`` state (``_ssl_buffer``, ``_ssl_buffer_view``, the transport's
``_ssl_protocol``), present from Python 3.11 (the pure-Python TLS implementation) on; anything else is left as it
is, so a change in asyncio costs memory, never correctness.
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio.sslproto import SSLProtocol

IDLE_BYTES = 4 << 10  # a heartbeat, a ping, a small control message
TRANSFER_BYTES = 64 << 10  # once a read fills the idle buffer (asyncio's own size: 256 KiB)
SHRINK_AFTER = 2  # small reads in a row before a transfer-size buffer is given back


def lean_reads(transport: asyncio.BaseTransport) -> bool:
    """Give the TLS connection of ``transport`` (what ``loop.start_tls`` returned) the adaptive read buffer of this
    module; True if it applied (False: not asyncio's TLS transport, nothing changed)."""
    protocol = getattr(transport, "_ssl_protocol", None)
    if not isinstance(protocol, SSLProtocol) or not hasattr(protocol, "_ssl_buffer_view"):
        return False
    ref = weakref.ref(protocol)  # the protocol holds these functions: no reference cycle through them
    small_reads = 0

    def resize(proto: SSLProtocol, size: int) -> None:
        proto._ssl_buffer = bytearray(size)  # type: ignore[attr-defined]
        proto._ssl_buffer_view = memoryview(proto._ssl_buffer)  # type: ignore[attr-defined]

    def get_buffer(n: int) -> memoryview:
        proto = ref()
        assert proto is not None
        return proto._ssl_buffer_view  # type: ignore[attr-defined, no-any-return]

    def buffer_updated(nbytes: int) -> None:
        nonlocal small_reads
        proto = ref()
        assert proto is not None
        SSLProtocol.buffer_updated(proto, nbytes)  # copies the bytes into the TLS object's memory BIO
        size = len(proto._ssl_buffer)  # type: ignore[attr-defined]
        if nbytes >= size and size < TRANSFER_BYTES:
            resize(proto, TRANSFER_BYTES)  # a transfer: read in larger pieces
            small_reads = 0
        elif size > IDLE_BYTES and nbytes <= IDLE_BYTES:
            small_reads += 1
            if small_reads >= SHRINK_AFTER:
                resize(proto, IDLE_BYTES)
                small_reads = 0
        else:
            small_reads = 0

    resize(protocol, IDLE_BYTES)
    protocol.get_buffer = get_buffer  # type: ignore[method-assign]
    protocol.buffer_updated = buffer_updated  # type: ignore[method-assign]
    return True
