"""ClickHouse through clickhouse-connect: ``chdb://<path>`` (the engine in-process) or
``http(s)://host:8123`` (a server), one code path.

A chDB URL's query holds engine options: ``database`` picks the database, and any other
key is passed to the engine as ``--key=value`` (``config-file=users.xml`` gives the engine
users and grants, as a server has). One process holds one chDB engine.

clickhouse-connect is synchronous, so every call runs on one dedicated thread: the event
loop keeps consuming while a batch is written (chDB releases the GIL while it works), and
one thread means one client is never used by two callers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import clickhouse_connect
import structlog
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError, ProgrammingError

log = structlog.get_logger("autoserve.reporter.clickhouse")

T = TypeVar("T")


def default_url(data_dir: Path) -> str:
    return f"chdb://{(data_dir / 'clickhouse').resolve()}"


def check_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in ("chdb", "http", "https"):
        raise ValueError(f"clickhouse url: scheme must be chdb, http or https, got {url!r}")
    return url


# Query settings shown in logs as they are; any other value (``access_token=...``, say) is
# hidden, since a setting can carry a credential.
SHOWN_SETTINGS = frozenset({"database", "secure", "verify", "compress", "config-file"})


def describe(url: str) -> str:
    """The URL without a password or unknown query values, for logs."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    if not parts.query:
        return url
    shown = "&".join(
        pair if pair.partition("=")[0] in SHOWN_SETTINGS else f"{pair.partition('=')[0]}=***"
        for pair in parts.query.split("&")
    )
    return url[: url.rindex("?") + 1] + shown


def _client_for(url: str) -> Client:
    if not url.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=url, compress=False)
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    database = options.pop("database", None)
    Path(parts.path).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=f"chdb://{parts.path}", database=database, chdb_options=options or None)


class Store:
    def __init__(self, url: str) -> None:
        self.url = check_url(url)
        self._client: Client | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")

    def _connect(self) -> Client:
        if self._client is None:
            self._client = _client_for(self.url)
        return self._client

    def _call(self, fn: Callable[[Client], T]) -> T:
        try:
            return fn(self._connect())
        except (OperationalError, ProgrammingError):
            # The connection (or the client) is gone: reconnect on the next call. A server
            # error (a missing table, say) keeps the client.
            self._drop_client()
            raise

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def run(self, fn: Callable[[Client], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        return await self.run(lambda c: c.command(sql, parameters=parameters))

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        return await self.run(lambda c: c.query(sql, parameters=parameters).result_rows)

    async def insert_lines(self, table: str, columns: Sequence[str], lines: bytes) -> None:
        """Insert rows encoded as JSONCompactEachRow: ClickHouse parses them in C++,
        far cheaper than clickhouse-connect serialising Python values column by column."""
        await self.run(lambda c: c.raw_insert(table, list(columns), lines, fmt="JSONCompactEachRow"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_client)
        self._executor.shutdown(wait=False)
