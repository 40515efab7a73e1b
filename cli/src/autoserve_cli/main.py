"""The ``autoserve`` command line: one entry point for operators and for deploy/."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

import nats.errors

from autoserve_config import ConfigError, load_config, parse_switch
from autoserve_runtime import DEFAULT_NATS_URL, NatsUnavailable, configure_logging
from autoserve_runtime.bus import NatsAuth, NatsConfigError, absorb_url_credentials
from autoserve_runtime.ownership import member_name

from .services import SERVICES

EXIT_CONFIG = 2
NATS_AUTH_FLAGS = (
    ("--nats-user", "AUTOSERVE_NATS_USER", "NATS user; its password from AUTOSERVE_NATS_PASSWORD(_FILE)"),
    ("--nats-password-file", "AUTOSERVE_NATS_PASSWORD_FILE", "file holding the NATS user's password"),
    ("--nats-token-file", "AUTOSERVE_NATS_TOKEN_FILE", "file holding a NATS token"),
    ("--nats-creds", "AUTOSERVE_NATS_CREDS", "NATS .creds file (JWT + nkey seed; needs the nkeys package)"),
    ("--nats-tls-ca", "AUTOSERVE_NATS_TLS_CA", "CA bundle to verify the NATS server"),
    ("--nats-tls-cert", "AUTOSERVE_NATS_TLS_CERT", "client certificate for NATS (mutual TLS)"),
    ("--nats-tls-key", "AUTOSERVE_NATS_TLS_KEY", "client key for NATS (mutual TLS)"),
    (
        "--nats-inbox-prefix",
        "AUTOSERVE_NATS_INBOX_PREFIX",
        "where replies arrive; the deploy config wants _INBOX_<user>",
    ),
)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _hours(value: str) -> float:
    from autoserve_reporter.core.report import BadRequest, parse_hours

    try:
        return parse_hours(value)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cluster_size(value: str) -> int:
    """``--cluster N``: a Raft majority needs an odd number of nodes, and 3 or 5 is what
    JetStream replicates to."""
    if value.strip() not in ("3", "5"):
        raise argparse.ArgumentTypeError(f"a local cluster has 3 or 5 nodes, got {value!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoserve", description="AutoServe Health: health monitoring and recovery")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def nats_option(p: argparse.ArgumentParser, default: str | None = DEFAULT_NATS_URL) -> None:
        p.add_argument(
            "--nats-url",
            default=os.environ.get("AUTOSERVE_NATS_URL") or default,
            help=f"NATS server URL (env AUTOSERVE_NATS_URL; default {default or 'an embedded nats-server'})",
        )
        # Credentials and TLS: files or names, never a secret on the command line (ps shows it).
        for flag, var, text in NATS_AUTH_FLAGS:
            p.add_argument(flag, dest=var.lower(), metavar="VALUE" if var.endswith(("USER", "PREFIX")) else "FILE",
                           help=f"{text} (env {var})")  # fmt: skip

    up = commands.add_parser("up", help="run the whole system on this machine, with live status")
    up.add_argument("-c", "--config", type=Path, help="config file to apply")
    nats_option(up, default=None)
    up.add_argument(
        "--data-dir", type=Path, default=Path(_env("AUTOSERVE_DATA_DIR", ".autoserve")), help="env AUTOSERVE_DATA_DIR"
    )
    up.add_argument("--nats-port", type=int, default=4222, help="embedded nats-server port; a free one if taken")
    up.add_argument(
        "--cluster", type=_cluster_size, metavar="N",
        help="run the bus as a local N-node NATS JetStream cluster (3 or 5, on free ports) instead of one "
        "nats-server, every stream and bucket with N replicas (AUTOSERVE_STREAM_REPLICAS overrides)",
    )  # fmt: skip
    up.add_argument("--demo", action="store_true", help="also start the bundled demo targets")
    up.add_argument("--prober-workers", type=int, default=1, help="prober processes, each a member of the prober")
    up.add_argument("--no-status", action="store_true", help="do not show the live status table")

    run = commands.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=list(SERVICES))
    nats_option(run)
    run.add_argument("--workers", type=int, default=int(_env("AUTOSERVE_PROBER_WORKERS", "1")), help="prober processes")
    run.add_argument("--shard", help=argparse.SUPPRESS)
    run.add_argument(
        "--member",
        help="this process's name among its service's members, shown by `autoserve status` (env AUTOSERVE_MEMBER; "
        "default <host name>-<pid>; prober workers add -w<i>)",
    )
    # Deprecated (breaker members share the breakers by membership): accepted, ignored with a warning.
    run.add_argument("--replica", default=os.environ.get("AUTOSERVE_BREAKER_REPLICA"), help=argparse.SUPPRESS)
    run.add_argument(
        "--clickhouse-url", help="reporter: env AUTOSERVE_CLICKHOUSE_URL; default chdb://<data dir>/clickhouse"
    )
    run.add_argument(
        "--clickhouse-read-url",
        help="reporter: where reports read, e.g. a SELECT-only user (env AUTOSERVE_CLICKHOUSE_READ_URL; "
        "default the --clickhouse-url)",
    )
    run.add_argument("--data-dir", help="reporter: env AUTOSERVE_DATA_DIR (default ./.autoserve)")
    run.add_argument(
        "--listen", help="reporter: report API HOST:PORT (env AUTOSERVE_REPORTER_LISTEN; default 127.0.0.1:8710)"
    )
    run.add_argument("--metrics-retention-days", help="reporter: env AUTOSERVE_METRICS_RETENTION_DAYS (default 30)")
    run.add_argument("--events-retention-days", help="reporter: env AUTOSERVE_EVENTS_RETENTION_DAYS (default 90)")
    run.add_argument(
        "--metrics-port",
        type=int,
        help="/healthz, /readyz, /metrics port (env AUTOSERVE_METRICS_PORT; default: the service's own, "
        "prober 9461, detector 9462, breaker 9463, recovery 9464, reporter 9465, alerter 9466; 0 turns it off)",
    )
    run.add_argument("--metrics-host", help="address they listen on (env AUTOSERVE_METRICS_HOST; default 127.0.0.1)")
    docker = run.add_mutually_exclusive_group()
    docker.add_argument("--docker", dest="docker", action="store_true", default=None, help="require Docker discovery")
    docker.add_argument("--no-docker", dest="docker", action="store_false", help="turn Docker discovery off")
    # neither flag: env AUTOSERVE_DOCKER=true|false (read in main); unset: use Docker if its socket is there

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the reporter's ClickHouse tables, set their retention, and exit"
    )
    migrate.add_argument(
        "--clickhouse-url", help="env AUTOSERVE_CLICKHOUSE_URL (a user with CREATE TABLE and ALTER TTL); "
        "default chdb://<data dir>/clickhouse"
    )  # fmt: skip
    migrate.add_argument("--data-dir", help="env AUTOSERVE_DATA_DIR (default ./.autoserve)")
    migrate.add_argument("--metrics-retention-days", help="env AUTOSERVE_METRICS_RETENTION_DAYS (default 30)")
    migrate.add_argument("--events-retention-days", help="env AUTOSERVE_EVENTS_RETENTION_DAYS (default 90)")

    for name, text in (
        ("check", "validate a config file"),
        ("apply", "validate a config file and store it in NATS KV"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("-c", "--config", type=Path, required=True)
        if name == "apply":
            nats_option(p)

    status = commands.add_parser("status", help="instances: health, breaker, last probe, failure and recovery")
    nats_option(status)
    status.add_argument("--once", action="store_true", help="print once instead of refreshing")
    status.add_argument("--json", action="store_true", help="print JSON once")
    status.add_argument("--app", help="only this app's instances")

    events = commands.add_parser("events", help="read or follow the event log")
    nats_option(events)
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    events.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="HealthChanged, FailureDetected, RecoveryExecuted, BreakerStateChanged, BreakerTrialAdmitted, "
        "ProbeCompleted, ContainerObserved or DeadLetter (or health, failure, ...); repeat or comma-separate; "
        "default: the audit trail (the first five)",
    )
    events.add_argument("--app", help="only this app")
    events.add_argument("--instance", help="only this instance")
    events.add_argument("--since", help="only events stored in the last 30s, 10m, 2h, 1d (default: all)")
    events.add_argument("--json", action="store_true", help="one JSON event per line")

    report = commands.add_parser("report", help="the seed's health report for an app, computed in ClickHouse")
    report.add_argument("app")
    report.add_argument("--hours", type=_hours, default=24.0, help="report period (default 24)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--exclude-maintenance", action="store_true", help="leave the alerting maintenance windows out of the period"
    )
    report.add_argument(
        "--reporter-url", help="the reporter's API (env AUTOSERVE_REPORTER_URL; default http://127.0.0.1:8710)"
    )

    breaker = commands.add_parser("breaker", help="hold a circuit breaker open or closed, or reset it")
    breaker.add_argument("action", choices=["open", "close", "reset"])
    breaker.add_argument("app")
    breaker.add_argument("instance")
    nats_option(breaker)
    alerts = commands.add_parser("alerts", help="alerts and silences: list, ack, silence")
    alert_commands = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    listing = alert_commands.add_parser("list", help="active alerts (from the event log)")
    listing.add_argument("--all", action="store_true", help="resolved ones too")
    acking = alert_commands.add_parser("ack", help="acknowledge an alert: no more repeats or escalation")
    acking.add_argument("id", help="the alert id (a unique prefix is enough)")
    acking.add_argument("--by", help="who acknowledges (default user@host)")
    acking.add_argument("--comment", default="")
    silencing = alert_commands.add_parser("silence", help="hold back an app's notifications for a while")
    silencing.add_argument("--app", required=True)
    silencing.add_argument("--instance", default="", help="only this instance")
    silencing.add_argument("--for", dest="duration", required=True, help="how long: 30m, 2h, 1d")
    silencing.add_argument("--reason", required=True)
    silencing.add_argument("--by", help="who silences (default user@host)")
    silencing.add_argument("--maintenance", action="store_true", help="a maintenance: reports may leave it out")
    alert_commands.add_parser("silences", help="active and pending silences")
    for p in (listing, acking, silencing, alert_commands.choices["silences"]):
        nats_option(p)
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
    if hasattr(args, "nats_url"):
        # Flags become the environment, so `up` and prober shards pass them to children; a
        # URL's user:password@ is moved out of it before anything can log it.
        for _flag, var, _text in NATS_AUTH_FLAGS:
            if getattr(args, var.lower(), None):
                os.environ[var] = getattr(args, var.lower())
        args.nats_url = absorb_url_credentials(args.nats_url)
        try:
            NatsAuth.from_env()
        except NatsConfigError as exc:
            print(f"autoserve {args.command}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.command == "run" and args.docker is None:
        try:
            args.docker = parse_switch("AUTOSERVE_DOCKER", os.environ.get("AUTOSERVE_DOCKER", ""))
        except ValueError as exc:
            print(f"autoserve run: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.command == "run" and args.member:
        try:
            os.environ["AUTOSERVE_MEMBER"] = member_name(args.member)  # the workers a prober spawns inherit it
        except ValueError as exc:
            print(f"autoserve run: --member: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.command != "run":  # a service configures its own logs; commands keep stdout for output
        configure_logging("cli", level=os.environ.get("AUTOSERVE_LOG_LEVEL", "warning"), json=False)
    try:
        return _dispatch(args)
    except NatsUnavailable as exc:
        print(f"autoserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except (nats.errors.Error, TimeoutError) as exc:  # refused (permissions) or no answer in time
        reason = str(exc) or type(exc).__name__
        print(f"autoserve {args.command}: NATS: {reason}; check the credential's permissions "
              "(deploy/README.md) and that the services are running", file=sys.stderr)  # fmt: skip
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
        from autoserve_runtime import request_endpoint

        request_endpoint(args.metrics_host, args.metrics_port)
        return importlib.import_module(SERVICES[args.service]).run_service(args)
    if args.command == "migrate":
        from autoserve_reporter.main import run_migrations

        return run_migrations(args)
    if args.command == "status":
        from .status import show_status

        return asyncio.run(show_status(args.nats_url, once=args.once or args.json, as_json=args.json, app=args.app))
    if args.command == "events":
        from .events import show_events

        return asyncio.run(
            show_events(args.nats_url, follow=args.follow, types=args.type, app=args.app, instance=args.instance,
                        since=args.since, as_json=args.json)
        )  # fmt: skip
    if args.command == "report":
        from .report import show_report

        return show_report(args.app, args.hours, args.json, args.reporter_url, args.exclude_maintenance)
    if args.command == "breaker":
        from .breaker import override

        return asyncio.run(override(args.nats_url, args.action, args.app, args.instance))
    if args.command == "alerts":
        from . import alerts

        action = args.alerts_command
        if action == "list":
            return asyncio.run(alerts.list_alerts(args.nats_url, args.all))
        if action == "ack":
            return asyncio.run(alerts.ack(args.nats_url, args.id, args.by, args.comment))
        if action == "silence":
            return asyncio.run(alerts.silence(args.nats_url, args.app, args.duration, args.reason, args.instance,
                                              args.by, args.maintenance))  # fmt: skip
        return asyncio.run(alerts.list_silences(args.nats_url))
    if args.command == "up":
        from .up import up

        config = _load_or_exit(args.config) if args.config else None
        return up(config, args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
