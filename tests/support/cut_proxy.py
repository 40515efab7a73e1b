"""A TCP proxy on 127.0.0.1 between a NATS client and its server that can hold what the
server sends and then cut the connection with it unread: the deliveries in flight when a
NATS node dies, made to order. The server counts them delivered; the client never sees them."""

from __future__ import annotations

import asyncio
import contextlib


class CutProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.held_bytes = 0  # read from the server while held, then thrown away by cut()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> CutProxy:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hold(self) -> None:
        """Stop passing the server's bytes on (they pile up here)."""
        self._flowing.clear()

    def cut(self) -> None:
        """Close every connection; what was held is lost. New connections flow again."""
        for client, upstream in self._links:
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._links.append((client_w, up_w))
        for task in (self._pump(client_r, up_w, held=False), self._pump(up_r, client_w, held=True)):
            spawned = asyncio.create_task(task)
            self._tasks.add(spawned)
            spawned.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, held: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if held and not self._flowing.is_set():
                    self.held_bytes += len(data)
                    continue  # read and dropped: as if in flight on a dying node
                writer.write(data)
                await writer.drain()
