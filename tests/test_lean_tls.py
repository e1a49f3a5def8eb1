"""``coordinator.lean_tls``: an idle TLS connection reads into 4 KiB, a transfer into 64 KiB (asyncio's own: 256 KiB),
and every byte arrives either way."""

import asyncio
import hashlib
import ssl

from coordinator.lean_tls import IDLE_BYTES, SHRINK_AFTER, TRANSFER_BYTES, lean_reads
from coordinator.tls import authority_files, create_authority, server_context


def test_read_buffer_is_small_idle_full_size_in_a_transfer_and_loses_nothing(tmp_path):
    files = create_authority(authority_files(tmp_path / "tls"), ["127.0.0.1"])
    blob = bytes(range(256)) * (12 << 10)  # 3 MiB

    async def main():
        sizes, received = [], asyncio.Queue()

        async def serve(reader, writer):
            protocol = writer.transport._ssl_protocol
            assert lean_reads(writer.transport)
            sizes.append(len(protocol._ssl_buffer))
            while line := await reader.readline():
                length = int(line)
                data = await reader.readexactly(length)
                sizes.append(len(protocol._ssl_buffer))
                await received.put(hashlib.sha256(data).hexdigest())
            writer.close()

        server = await asyncio.start_server(
            serve, "127.0.0.1", 0, ssl=server_context(str(files.server_cert), str(files.server_key), str(files.ca_cert))
        )
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(files.ca_cert))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)

        async def send(data: bytes) -> str:
            writer.write(b"%d\n" % len(data) + data)
            await writer.drain()
            return await asyncio.wait_for(received.get(), 30)

        assert await send(b"heartbeat") == hashlib.sha256(b"heartbeat").hexdigest()
        assert sizes[-1] == IDLE_BYTES
        assert await send(blob) == hashlib.sha256(blob).hexdigest()
        assert sizes[-1] == TRANSFER_BYTES  # a read filled the small buffer: transfer size
        for _ in range(SHRINK_AFTER):
            assert await send(b"ping") == hashlib.sha256(b"ping").hexdigest()
        assert sizes[-1] == IDLE_BYTES  # given back after small reads in a row
        writer.close()
        server.close()
        await server.wait_closed()
        return sizes

    sizes = asyncio.run(main())
    assert sizes[0] == IDLE_BYTES


def test_a_plain_transport_is_left_alone():
    class Plain(asyncio.Transport):
        pass

    assert lean_reads(Plain()) is False
