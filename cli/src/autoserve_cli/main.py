"""The ``autoserve`` command line: one entry point for operators and for deploy/."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

from autoserve_config import ConfigError, load_config
from autoserve_runtime import DEFAULT_NATS_URL, NatsUnavailable, configure_logging

from .services import SERVICES

EXIT_CONFIG = 2


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _hours(value: str) -> float:
    from autoserve_reporter.core.report import BadRequest, parse_hours

    try:
        return parse_hours(value)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoserve", description="AutoServe Health: health monitoring and recovery")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def nats_option(p: argparse.ArgumentParser, default: str | None = DEFAULT_NATS_URL) -> None:
        p.add_argument(
            "--nats-url",
            default=os.environ.get("AUTOSERVE_NATS_URL") or default,
            help=f"NATS server URL (env AUTOSERVE_NATS_URL; default {default or 'an embedded nats-server'})",
        )

    up = commands.add_parser("up", help="run the whole system on this machine, with live status")
    up.add_argument("-c", "--config", type=Path, help="config file to apply")
    nats_option(up, default=None)
    up.add_argument(
        "--data-dir", type=Path, default=Path(_env("AUTOSERVE_DATA_DIR", ".autoserve")), help="env AUTOSERVE_DATA_DIR"
    )
    up.add_argument("--nats-port", type=int, default=4222, help="embedded nats-server port; a free one if taken")
    up.add_argument("--demo", action="store_true", help="also start the bundled demo targets")
    up.add_argument("--prober-workers", type=int, default=1, help="prober processes (targets are sharded)")
    up.add_argument("--no-status", action="store_true", help="do not show the live status table")

    run = commands.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=list(SERVICES))
    nats_option(run)
    run.add_argument("--workers", type=int, default=int(_env("AUTOSERVE_PROBER_WORKERS", "1")), help="prober processes")
    run.add_argument("--shard", help=argparse.SUPPRESS)
    run.add_argument(
        "--replica",
        default=os.environ.get("AUTOSERVE_BREAKER_REPLICA"),
        help="breaker: this replica I/N, deciding for 1/N of the breakers (env AUTOSERVE_BREAKER_REPLICA)",
    )
    run.add_argument(
        "--clickhouse-url", help="reporter: env AUTOSERVE_CLICKHOUSE_URL; default chdb://<data dir>/clickhouse"
    )
    run.add_argument("--data-dir", help="reporter: env AUTOSERVE_DATA_DIR (default ./.autoserve)")
    run.add_argument(
        "--listen", help="reporter: report API HOST:PORT (env AUTOSERVE_REPORTER_LISTEN; default 127.0.0.1:8710)"
    )
    run.add_argument("--metrics-retention-days", help="reporter: env AUTOSERVE_METRICS_RETENTION_DAYS (default 30)")
    run.add_argument("--events-retention-days", help="reporter: env AUTOSERVE_EVENTS_RETENTION_DAYS (default 90)")
    docker = run.add_mutually_exclusive_group()
    docker.add_argument("--docker", dest="docker", action="store_true", default=None, help="require Docker discovery")
    docker.add_argument("--no-docker", dest="docker", action="store_false", help="turn Docker discovery off")

    for name, text in (
        ("check", "validate a config file"),
        ("apply", "validate a config file and store it in NATS KV"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("-c", "--config", type=Path, required=True)
        if name == "apply":
            nats_option(p)

    status = commands.add_parser("status", help="instances and their last probe")
    nats_option(status)
    status.add_argument("--once", action="store_true", help="print once instead of refreshing")
    status.add_argument("--json", action="store_true", help="print JSON once")

    report = commands.add_parser("report", help="the seed's health report for an app, computed in ClickHouse")
    report.add_argument("app")
    report.add_argument("--hours", type=_hours, default=24.0, help="report period (default 24)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--reporter-url", help="the reporter's API (env AUTOSERVE_REPORTER_URL; default http://127.0.0.1:8710)"
    )

    breaker = commands.add_parser("breaker", help="hold a circuit breaker open or closed, or reset it")
    breaker.add_argument("action", choices=["open", "close", "reset"])
    breaker.add_argument("app")
    breaker.add_argument("instance")
    nats_option(breaker)
    return parser


def _load_or_exit(path: Path):
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s), nothing applied:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":  # a service configures its own logs; commands keep stdout for output
        configure_logging("cli", level=os.environ.get("AUTOSERVE_LOG_LEVEL", "warning"), json=False)
    try:
        return _dispatch(args)
    except NatsUnavailable as exc:
        print(f"autoserve {args.command}: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        config = _load_or_exit(args.config)
        instances = sum(len(spec.instances) for spec in config.apps.values())
        print(f"{args.config}: ok ({len(config.apps)} apps, {instances} static instances)")
        return 0
    if args.command == "apply":
        from .apply import apply_config

        config = _load_or_exit(args.config)
        return asyncio.run(apply_config(config, args.nats_url))
    if args.command == "run":
        return importlib.import_module(SERVICES[args.service]).run_service(args)
    if args.command == "status":
        from .status import show_status

        return asyncio.run(show_status(args.nats_url, once=args.once or args.json, as_json=args.json))
    if args.command == "report":
        from .report import show_report

        return show_report(args.app, args.hours, args.json, args.reporter_url)
    if args.command == "breaker":
        from .breaker import override

        return asyncio.run(override(args.nats_url, args.action, args.app, args.instance))
    if args.command == "up":
        from .up import up

        config = _load_or_exit(args.config) if args.config else None
        return up(config, args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
