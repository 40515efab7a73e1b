"""Least privilege on the real ClickHouse engine: the grants of deploy/clickhouse-users.sql,
executed by chDB, are enough for each part of the reporter and no more.

chDB keeps users in a users.xml (it has no SQL user storage), so each user of the SQL file
becomes one users.xml whose grant queries are the file's own GRANT statements, flattened
from its roles. One process holds one engine, so each user runs in its own process, one
after the other, on the same data: the schema user migrates, the reporter (INSERT only)
ingests from a real nats-server, and the reader (SELECT only) computes the reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from autoserve_events import EVENTS_STREAM, PROBES_STREAM
from autoserve_reporter.service import ReporterSettings, consumer_specs
from autoserve_runtime import EmbeddedNatsServer, provision

from ..incidents import incident_events
from ..support.waiting import wait_for
from .test_reporter import ReporterProcess, probe, publish

USERS_SQL = Path(__file__).parents[2] / "deploy" / "clickhouse-users.sql"
DATABASE = "autoserve"


def sql_users(sql: str) -> tuple[list[str], dict[str, list[str]], dict[str, dict[str, str]]]:
    """The file's statements as (database statements, each user's grant queries, each
    user's settings). Roles are flattened into their users; passwords are left out."""
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", sql).split(";") if s.strip()]
    databases = [s for s in statements if s.upper().startswith("CREATE DATABASE")]
    roles: dict[str, list[str]] = {}
    profiles: dict[str, dict[str, str]] = {}
    users: dict[str, list[str]] = {}
    settings: dict[str, dict[str, str]] = {}
    for s in statements:
        words = " ".join(s.split())
        if m := re.fullmatch(r"CREATE ROLE IF NOT EXISTS (\w+)", words):
            roles[m[1]] = []
        elif m := re.fullmatch(r"CREATE SETTINGS PROFILE IF NOT EXISTS (\w+) SETTINGS (.+)", words):
            profiles[m[1]] = dict(re.findall(r"(\w+) = (\w+)", m[2]))
        elif m := re.match(r"CREATE USER IF NOT EXISTS (\w+)", words):
            users[m[1]] = []
            profile = re.search(r"SETTINGS PROFILE (\w+)", words)
            settings[m[1]] = profiles[profile[1]] if profile else {}
        elif m := re.fullmatch(r"GRANT (.+) ON (\S+) TO (\w+)", words):
            roles[m[3]].append(f"GRANT {m[1]} ON {m[2]}")
        elif m := re.fullmatch(r"GRANT ([\w, ]+) TO (\w+)", words):
            users[m[2]] += [grant for role in m[1].split(", ") for grant in roles[role]]
    return databases, users, settings


def users_xml(grants: list[str] | None, settings: dict[str, str]) -> str:
    """A users.xml whose only user has these grants (None: an administrator)."""
    rights = (
        "<access_management>1</access_management>"
        if grants is None
        else "<grants>" + "".join(f"<query>{g}</query>" for g in grants) + "</grants>"
    )
    profile = "".join(f"<{k}>{v}</{k}>" for k, v in settings.items())
    return (
        "<clickhouse><users><default><password></password><networks><ip>::1</ip><ip>127.0.0.1</ip></networks>"
        f"<profile>default</profile><quota>default</quota>{rights}</default></users>"
        f"<profiles><default>{profile}</default></profiles><quotas><default/></quotas></clickhouse>"
    )


class Engine:
    """chDB URLs for one data directory, one per user of the SQL file."""

    def __init__(self, root: Path) -> None:
        self.data = root / "clickhouse"
        self.root = root
        databases, self.grants, self.settings = sql_users(USERS_SQL.read_text())
        self.database_statements = databases

    def url(self, user: str | None) -> str:
        xml = self.root / f"users-{user or 'admin'}.xml"
        xml.write_text(users_xml(self.grants[user] if user else None, self.settings.get(user or "", {})))
        config = self.root / f"config-{user or 'admin'}.xml"
        config.write_text(f"<clickhouse><users_config>{xml}</users_config></clickhouse>")
        return f"chdb://{self.data}?database={DATABASE if user else 'default'}&config-file={config}"


async def python(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def autoserve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return await python("import sys; from autoserve_cli.main import main; sys.exit(main())", *args, env=env)


# Runs each statement given on the command line with the Store the reporter uses; prints
# one JSON line per statement: its rows, or the error.
RUN_SQL = """
import asyncio, json, sys
from autoserve_reporter.adapters.clickhouse import Store

async def main():
    store = Store(sys.argv[1])
    for sql in sys.argv[2:]:
        try:
            print(json.dumps({"result": str(await store.command(sql))}))
        except Exception as exc:
            print(json.dumps({"error": str(exc)}))
    await store.close()

asyncio.run(main())
"""

# The reports, computed by the queries the report API runs.
REPORTS = """
import asyncio, json, sys, time
import msgspec
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.queries import Reports

async def main():
    store = Store(sys.argv[1])
    reports = Reports(store)
    now = time.time()
    print(json.dumps({
        "report": msgspec.to_builtins(await reports.health_report("shop", 1, now)),
        "incidents": msgspec.to_builtins(await reports.incidents("shop", 1, now)),
        "timeline": msgspec.to_builtins(await reports.timeline("shop", 1, now)),
    }))
    await store.close()

asyncio.run(main())
"""


async def run_sql(url: str, *statements: str) -> list[dict]:
    code, out, err = await python(RUN_SQL, url, *statements)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_the_sql_file_gives_each_user_only_its_own_grants() -> None:
    _, grants, settings = sql_users(USERS_SQL.read_text())
    assert grants == {
        "reporter": ["GRANT INSERT ON autoserve.*"],
        "reader": ["GRANT SELECT ON autoserve.*"],
        "migrator": [
            "GRANT CREATE TABLE, ALTER TTL ON autoserve.*",
            "GRANT SELECT, INSERT ON autoserve.autoserve_schema_migrations",
        ],
    }
    assert settings["reader"] == {"readonly": "1"}


@pytest.mark.timeout(300)
async def test_migrate_ingest_and_report_each_run_with_only_their_grants(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    engine = Engine(tmp_path)
    admin, migrator, reporter, reader = (engine.url(u) for u in (None, "migrator", "reporter", "reader"))
    assert all("error" not in r for r in await run_sql(admin, *engine.database_statements))

    # The reporter, INSERT only, may not create its tables: it says what to run instead.
    env = {"AUTOSERVE_CLICKHOUSE_URL": reporter, "AUTOSERVE_REPORTER_MIGRATE": "false"}
    code, _, err = await autoserve("run", "reporter", "--nats-url", nats_server.url, "--metrics-port", "0", env=env)
    assert code != 0 and "run `autoserve migrate`" in err, err
    code, _, err = await autoserve("migrate", "--clickhouse-url", reporter)
    assert code == 1 and "Not enough privileges" in err, err

    code, out, err = await autoserve("migrate", "--clickhouse-url", migrator, "--metrics-retention-days", "7")
    assert code == 0 and "migrations applied: [1, 2]" in out, err
    code, out, err = await autoserve("migrate", "--clickhouse-url", migrator, "--metrics-retention-days", "7")
    assert code == 0 and "schema up to date" in out, err

    # Ingest from a real nats-server with INSERT only.
    js = nc.jetstream()
    await provision(js)
    process = await ReporterProcess(nats_server.url, reporter, tmp_path / "reporter.log", **env).start()
    try:
        now = time.time()
        probes = [probe("shop", "i-1", now - 600 + i, rt=10.0 * (i + 1), healthy=i < 8) for i in range(10)]
        incident = incident_events("shop", "i-1", now - 300, ttr=5.0)
        await publish(nc, probes + incident)
        probes_durable, events_durable = (spec.durable for spec in consumer_specs(ReporterSettings("")))

        async def stored(stream: str, durable: str, n: int) -> bool:
            info = await js.consumer_info(stream, durable)
            return info.ack_floor.stream_seq >= n and info.num_ack_pending == 0

        # Acknowledged only after their batch is stored: every message is in ClickHouse.
        await wait_for(lambda: stored(PROBES_STREAM, probes_durable, len(probes)), 60, "probes stored")
        await wait_for(lambda: stored(EVENTS_STREAM, events_durable, len(incident)), 60, "events stored")
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{process.url}/v1/apps/shop/report", params={"hours": 1})
        # This reporter has no reader URL and its engine may not SELECT: the API says why.
        assert response.status_code == 503 and "Not enough privileges" in response.json()["error"]
    finally:
        code = await process.sigterm()
    assert code == 0, process.log.read_text()[-2000:]

    # The reports, with SELECT only.
    code, out, err = await python(REPORTS, reader)
    assert code == 0, err
    result = json.loads(out)
    report = result["report"]
    assert (report["total_health_checks"], report["successful_checks"], report["failed_checks"]) == (10, 8, 2)
    assert report["uptime_percent"] == 80.0
    assert report["avg_response_time_ms"] == pytest.approx(55.0)
    [found] = result["incidents"]["incidents"]
    assert found["time_to_recover_s"] == pytest.approx(5.0) and found["recovered_by"] == "restart_container"
    assert sum(b["total_health_checks"] for b in result["timeline"]["buckets"]) == 10

    # And nothing more than each needs.
    [reader_insert, reader_ddl] = await run_sql(
        reader, "INSERT INTO health_metrics (app_name) VALUES ('x')", "DROP TABLE events"
    )
    [writer_select] = await run_sql(reporter, "SELECT count() FROM health_metrics")
    [migrator_drop, migrator_select] = await run_sql(migrator, "DROP TABLE events", "SELECT count() FROM events")
    for refused in (reader_insert, reader_ddl, writer_select, migrator_drop, migrator_select):
        assert "error" in refused and ("Not enough privileges" in refused["error"] or "readonly" in refused["error"])
