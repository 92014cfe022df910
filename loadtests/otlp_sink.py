"""A minimal OTLP/HTTP trace sink for the tracing-on benchmark: accepts and drops spans.

`python -m loadtests.otlp_sink PORT` answers every POST with 200 and an empty protobuf
body (an empty ExportTraceServiceResponse is zero bytes), counting requests and bytes.
It runs as its own process so its CPU is not billed to the server or the load generator.
"""

from __future__ import annotations

import asyncio
import sys

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
    b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"
)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
