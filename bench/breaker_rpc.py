"""The breaker's ``allow`` round trip over NATS against a bare nats-py echo responder, and
how many reported outcomes one breaker process folds per second.

Each party is its own process: nats-server, ``autoserve run breaker``, the echo responder
(``python bench/breaker_rpc.py echo URL``) and the client (``python bench/breaker_rpc.py
client ...``, one process, uvloop, printing one JSON line). Everything is on 127.0.0.1 and
every wait is bounded. ``main()`` prints a rich table and returns the Markdown.

    .venv/bin/python bench/breaker_rpc.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LOG_DIR, VENV_BIN, WORK_DIR, Table, cpu_seconds, fmt

ECHO_SUBJECT = "bench.echo"  # outside every stream, as the breaker's RPC subject
REPLY = b'{"allow":true,"state":"closed"}'  # the same bytes the breaker answers
SECONDS = 3.0
WARMUP = 0.5
REPORTS = 300_000
REPORT_KEYS = 1000
MAX_REQUESTS = 500_000  # per run: a bound on top of the time budget


# ---------------------------------------------------------------------------- child processes


async def _echo(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        await nc.publish(msg.reply, REPLY)

    await nc.subscribe(ECHO_SUBJECT, cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await nc.close()


async def _client(url: str, subject: str, payload: bytes, in_flight: int, seconds: float) -> dict:
    import nats

    nc = await nats.connect(url)
    latencies: list[float] = []
    errors = 0

    async def worker(until: float, record: bool) -> None:
        nonlocal errors
        clock = time.perf_counter
        while clock() < until and len(latencies) < MAX_REQUESTS:
            start = clock()
            try:
                await nc.request(subject, payload, timeout=5)
            except Exception:
                errors += 1
                continue
            if record:
                latencies.append(clock() - start)

    await asyncio.gather(*(worker(time.perf_counter() + WARMUP, False) for _ in range(in_flight)))
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(start + seconds, True) for _ in range(in_flight)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    await nc.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "client_cpu_s": cpu,
    }


async def _reporter(url: str, count: int) -> dict:
    """Publishes ``count`` outcomes over ``REPORT_KEYS`` instances, then three failures for
    the sentinel; the sentinel's open transition says the breaker folded everything before."""
    import nats

    from autoserve_events import breaker_report, wildcard
    from autoserve_events.catalogue import BreakerStateChanged

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    opened = asyncio.Event()
    done_at = 0.0

    async def on_change(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal done_at
        done_at = time.perf_counter()
        opened.set()

    await nc.subscribe(wildcard(BreakerStateChanged, "sentinel", "*"), cb=on_change)
    subjects = [breaker_report("bench", f"bench-{i}") for i in range(REPORT_KEYS)]
    ok, failed = b'{"success":true,"duration_ms":12.5}', b'{"success":false,"duration_ms":80.0}'
    start = time.perf_counter()
    for i in range(count):
        await nc.publish(subjects[i % REPORT_KEYS], failed if i % 10 == 0 else ok)
        if i % 5000 == 0:
            await nc.flush()
    published = time.perf_counter() - start
    for _ in range(3):
        await nc.publish(breaker_report("sentinel", "s-1"), failed)
    await nc.flush()
    await asyncio.wait_for(opened.wait(), 120)
    await nc.close()
    elapsed = done_at - start
    return {"reports": count + 3, "seconds": elapsed, "per_second": (count + 3) / elapsed, "publish_s": published}


def _child_main(argv: list[str]) -> None:
    import uvloop

    if argv[0] == "echo":
        uvloop.run(_echo(argv[1]))
    elif argv[0] == "client":
        url, subject, payload, in_flight, seconds = argv[1:6]
        result = uvloop.run(_client(url, subject, payload.encode(), int(in_flight), float(seconds)))
        print(json.dumps(result), flush=True)
    elif argv[0] == "reporter":
        print(json.dumps(uvloop.run(_reporter(argv[1], int(argv[2])))), flush=True)
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


# ---------------------------------------------------------------------------- the run


def _python(*args: str, timeout: float = 180.0) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def _prepare(url: str) -> None:
    from autoserve_cli.apply import store_config
    from autoserve_config import load_config_text
    from autoserve_runtime import connect, provision

    config = {
        "apps": {
            "bench": {
                "health_check": {"enabled": False},
                "instances": [{"id": "bench-0", "host": "127.0.0.1", "port": 9}],
                # the windows on: the fold does its full work per outcome
                "breaker": {"failure_threshold": 50, "failure_rate_threshold": 50, "sliding_window_size": 100},
            },
            "sentinel": {"health_check": {"enabled": False}, "breaker": {"failure_threshold": 3}},
        }
    }
    nc = await connect(url, "bench-breaker", timeout=10)
    try:
        await provision(nc.jetstream())
        await store_config(nc.jetstream(), load_config_text(json.dumps(config)))
    finally:
        await nc.close()


async def _wait_allow(url: str, breaker: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import nats

    from autoserve_events import BREAKER_ALLOW_RPC

    nc = await nats.connect(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if breaker.poll() is not None:
                raise RuntimeError(f"breaker exited with {breaker.returncode}; see {LOG_DIR}/breaker-bench.log")
            try:
                await nc.request(BREAKER_ALLOW_RPC, b'{"app_name":"bench","instance_id":"bench-0"}', timeout=0.5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the breaker did not answer within {timeout:g}s") from None
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def run_bench(seconds: float = SECONDS, reports: int = REPORTS) -> list[Table]:
    from autoserve_events import BREAKER_ALLOW_RPC
    from autoserve_runtime import EmbeddedNatsServer, spawn_child, stop_child

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    data = WORK_DIR / "breaker-rpc-nats"
    shutil.rmtree(data, ignore_errors=True)
    server = EmbeddedNatsServer(data, log_file=LOG_DIR / "breaker-rpc-nats.log").start()
    children: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(_prepare(server.url))
        env = {**os.environ, "AUTOSERVE_LOG_LEVEL": "warning"}
        with (LOG_DIR / "breaker-bench.log").open("ab") as log:
            breaker = spawn_child(
                [str(VENV_BIN / "autoserve"), "run", "breaker", "--nats-url", server.url],
                stdout=log, stderr=log, env=env,
            )  # fmt: skip
        children.append(breaker)
        echo = subprocess.Popen(
            [sys.executable, __file__, "echo", server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        children.append(echo)
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echo responder did not start")
        asyncio.run(_wait_allow(server.url, breaker))

        request = '{"app_name":"bench","instance_id":"bench-0"}'
        rpc = Table(
            "Breaker allow round trip over NATS vs a bare nats-py echo responder (one client process, uvloop)",
            ["responder", "in flight", "requests", "req/s", "p50 ms", "p99 ms", "p99 vs bare", "req/s vs bare"],
        )
        goals: list[str] = []
        for in_flight in (1, 64):
            bare = _python("client", server.url, ECHO_SUBJECT, request, str(in_flight), str(seconds))
            cpu0 = cpu_seconds(breaker.pid)
            ours = _python("client", server.url, BREAKER_ALLOW_RPC, request, str(in_flight), str(seconds))
            breaker_cpu = cpu_seconds(breaker.pid) - cpu0
            for name, r in (("bare echo (nats-py)", bare), ("breaker allow", ours)):
                rpc.add(
                    name, in_flight, fmt(r["requests"]), fmt(r["rps"]), fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2),
                    f"{r['p99_ms'] / bare['p99_ms']:.2f}x", f"{100 * r['rps'] / bare['rps']:.0f}%",
                )  # fmt: skip
            ratio, share = ours["p99_ms"] / bare["p99_ms"], ours["rps"] / bare["rps"]
            met = "met" if ratio <= 2.0 and share >= 0.7 else "NOT met"
            goals.append(
                f"{in_flight} in flight: p99 {ratio:.2f}x of bare (goal <= 2x), throughput {share:.0%} "
                f"(goal >= 70%): {met}; breaker CPU {breaker_cpu:.2f} s, errors {ours['errors']}"
            )
        rpc.notes += [
            f"{seconds:g} s per run after {WARMUP:g} s of warm-up; the bare responder and the breaker each run in "
            "their own process; replies are the same bytes.",
            *goals,
        ]

        cpu0 = cpu_seconds(breaker.pid)
        ingest = _python("reporter", server.url, str(reports))
        cpu = cpu_seconds(breaker.pid) - cpu0
        fold = Table(
            "Breaker report ingestion: outcomes one breaker process folds per second",
            ["reports", "instances", "seconds", "outcomes/s", "breaker CPU s", "outcomes/CPU-s"],
        )
        fold.add(
            fmt(ingest["reports"]), fmt(REPORT_KEYS), fmt(ingest["seconds"], 2), fmt(ingest["per_second"]),
            fmt(cpu, 2), fmt(ingest["reports"] / cpu if cpu else 0),
        )  # fmt: skip
        fold.notes.append(
            "Plain NATS publishes of {success, duration_ms} on autoserve.breaker.report.<app>.<instance> from one "
            "client; timed until the breaker publishes the transition that the last three reports cause. "
            f"Sliding window and consecutive counts on. Goal >= 50,000/s: "
            f"{'met' if ingest['per_second'] >= 50_000 else 'NOT met'}."
        )
        return [rpc, fold]
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            stop_child(child, 10.0)
        server.stop()


def main() -> str:
    """Run the benchmark, print the tables, return them as Markdown."""
    from rich.console import Console

    tables = run_bench()
    console = Console()
    for table in tables:
        console.print(table.rich())
    return "\n".join(table.markdown() for table in tables)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _child_main(sys.argv[1:])
    else:
        main()
