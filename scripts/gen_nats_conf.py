"""Write deploy/nats/nats-server.conf: one least-privilege NATS user per service.

The permissions are derived from the code: subjects and streams from ``autoserve_events``,
each service's durable consumers from its own module, the KV buckets from
``autoserve_runtime.provisioning``. ``tests/integration/test_security.py``
(``test_the_committed_nats_config_is_the_generated_one``) fails when the committed file
differs from what this prints, and the rest of that file runs a real nats-server on it.

Replies are private: each user may subscribe only to its own inbox prefix,
``_INBOX_<user>.>`` (``inbox_prefix``; a client sets it with ``AUTOSERVE_NATS_INBOX_PREFIX``).
The breaker answers requests with ``allow_responses`` (it may publish once to the reply
subject of a request it received) instead of a grant on every inbox.

    .venv/bin/python scripts/gen_nats_conf.py            # rewrite the file
    .venv/bin/python scripts/gen_nats_conf.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from autoserve_detector.service import CONSUMER as DETECTOR_CONSUMER

from autoserve_alerter.service import CONSUMER as ALERTER_CONSUMER
from autoserve_events import (
    APPS_BUCKET,
    BREAKER_ALLOW_RPC,
    BREAKER_OVERRIDE_RPC,
    BREAKER_REPORT_WILDCARD,
    EVENTS_STREAM,
    PROBES_STREAM,
    SETTINGS_BUCKET,
    AlertAcknowledged,
    AlertChanged,
    BreakerStateChanged,
    FailureDetected,
    HealthChanged,
    NotificationLogged,
    RecoveryExecuted,
    SilenceCreated,
    deadletter,
    durables,
    stream_specs,
)
from autoserve_events.subjects import _ONE_TOKEN, PREFIX, PROBES_WILDCARD  # the catalogue's own stems
from autoserve_recovery.feeds import WORK_DURABLE
from autoserve_reporter.service import ReporterSettings, consumer_specs
from autoserve_runtime import ConsumerSpec
from autoserve_runtime.membership import MEMBER_SLOTS, slot_durable
from autoserve_runtime.provisioning import CLAIMS_BUCKET, MEMBERS_BUCKET, bucket_configs

OUTPUT = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "nats-server.conf"
# The breaker's answers to allow/override requests: one reply per request it received, while
# the requester still waits (an override is answered once JetStream stored it, within 5 s).
RESPONSES = {"max": 1, "expires": "30s"}


def inbox_prefix(user: str) -> str:
    """Where ``user``'s replies arrive: JetStream API answers, publish acks, KV watches and
    ordered-consumer deliveries, request/reply. Only ``user`` may subscribe under it."""
    return f"_INBOX_{user}"


def stem(event: type) -> str:
    """``autoserve.event.failure.>`` for FailureDetected: every app and instance."""
    from autoserve_events import wildcard

    return wildcard(event).removesuffix(".*.*") + ".>"


def one_token(event: type) -> str:
    """``autoserve.event.alert.ack.*`` for AlertAcknowledged: every app (or receiver)."""
    tokens, _field = _ONE_TOKEN[event]
    return f"{PREFIX}.{tokens}.*"


@dataclass
class User:
    name: str
    comment: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    inbox: bool = True  # may read its own replies (every user that makes requests)
    deny_publish: bool = False
    allow_responses: dict[str, object] | None = None

    def __post_init__(self) -> None:
        if self.inbox:
            self.subscribe.insert(0, f"{inbox_prefix(self.name)}.>")

    def pub(self, *subjects: str, why: str = "") -> User:
        self.publish += [f"# {why}"] * bool(why) + list(subjects)
        return self

    def sub(self, *subjects: str) -> User:
        self.subscribe += list(subjects)
        return self

    def responds(self, **limits: object) -> User:
        """Answers requests: may publish to the reply subject of a message it received."""
        self.allow_responses = limits
        return self

    # -- JetStream building blocks ---------------------------------------------------------

    def basics(self) -> User:
        """Provisioning checks (stream info only) and the app-spec watch every service does."""
        names = [s.name for s in stream_specs()] + [f"KV_{b.bucket}" for b in bucket_configs()]
        self.pub(*(f"$JS.API.STREAM.INFO.{n}" for n in names), why="provisioning checks: read-only")
        self.ordered(f"KV_{APPS_BUCKET}", why="watching the app specs")
        return self.member()

    def member(self) -> User:
        """Membership: its own keys and leases only (a prober cannot speak for a detector),
        the watch of its service's members, and reading a lease's holder."""
        self.pub(
            f"$KV.{MEMBERS_BUCKET}.{self.name}.>",
            f"$KV.{MEMBERS_BUCKET}.lease.{self.name}",
            f"$KV.{MEMBERS_BUCKET}.lease.{self.name}.>",
            f"$KV.{MEMBERS_BUCKET}.progress.{self.name}.>",
            f"$JS.API.DIRECT.GET.KV_{MEMBERS_BUCKET}",
            f"$JS.API.DIRECT.GET.KV_{MEMBERS_BUCKET}.>",
            f"$JS.API.STREAM.MSG.GET.KV_{MEMBERS_BUCKET}",
            why="membership: its own member keys, leases and progress marks",
        )
        return self.ordered(f"KV_{MEMBERS_BUCKET}", why="watching its service's members")

    def ordered(self, stream: str, why: str) -> User:
        """Ordered (ephemeral) consumers: created without a name, info, flow control."""
        return self.pub(
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.FC.{stream}.>",
            why=f"{why}: ordered consumers on {stream}",
        )

    def durable(self, spec: ConsumerSpec, *, push: bool = True) -> User:
        stream, name = spec.stream, spec.durable
        self.pub(
            f"$JS.API.CONSUMER.INFO.{stream}.{name}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
            f"$JS.API.CONSUMER.DELETE.{stream}.{name}",  # resumes at its ack floor by recreating
            f"$JS.ACK.{stream}.{name}.>",
            *([f"$JS.FC.{stream}.>"] if push else [f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"]),
            why=f"durable consumer {name} on {stream}",
        )
        if push:
            self.sub(spec.deliver_subject)
        return self

    def slot_durables(self, spec: ConsumerSpec) -> User:
        """One durable per member slot (membership.MEMBER_SLOTS): permissions cannot hold a
        wildcard inside a token, so each name is listed."""
        for slot in range(MEMBER_SLOTS):
            self.durable(replace(spec, durable=slot_durable(spec.durable, slot)))
        return self

    def render(self) -> str:
        def block(items: list[str]) -> str:
            lines = []
            for item in items:
                lines.append(f"          {item}" if item.startswith("#") else f'          "{item}"')
            return "\n".join(lines)

        publish = '{ deny: [">"] }' if self.deny_publish else "{ allow: [\n" + block(self.publish) + "\n        ] }"
        responses = ""
        if self.allow_responses is not None:
            limits = ", ".join(
                f'{k}: "{v}"' if isinstance(v, str) else f"{k}: {v}" for k, v in self.allow_responses.items()
            )
            responses = f"        allow_responses: {{ {limits} }}\n"
        return (
            f"    # {self.comment}\n"
            "    {\n"
            f"      user: {self.name}, password: ${password_var(self.name)}\n"
            "      permissions: {\n"
            f"        publish: {publish}\n"
            "        subscribe: { allow: [\n" + block(self.subscribe) + "\n        ] }\n"
            f"{responses}"
            "      }\n"
            "    }\n"
        )


def password_var(user: str) -> str:
    return f"AUTOSERVE_{user.upper()}_PASSWORD"


def users() -> list[User]:
    def pull(stream: str, durable: str) -> ConsumerSpec:
        return ConsumerSpec(stream, durable, "")

    prober = (
        User("prober", "prober: probe results and container observations")
        .pub(PROBES_WILDCARD, why="what it owns")
        .basics()
    )

    detector = (
        User("detector", "detector: health changes and failures, from the probes")
        .pub(stem(HealthChanged), stem(FailureDetected), deadletter("detector"), why="what it owns")
        .basics()
        .ordered(f"KV_{SETTINGS_BUCKET}", why="watching the detector settings")
        .ordered(PROBES_STREAM, why="the replay before consuming")
        .slot_durables(DETECTOR_CONSUMER)
    )

    breaker = (
        User("breaker", "breaker: breaker transitions; answers allow/override requests")
        .pub(stem(BreakerStateChanged), deadletter("breaker"), why="what it owns")
        .sub(BREAKER_REPORT_WILDCARD, BREAKER_ALLOW_RPC, BREAKER_OVERRIDE_RPC)
        .responds(**RESPONSES)  # its answers: on the requester's inbox, never any other
        .basics()
        .ordered(EVENTS_STREAM, why="its history, the last breaker event per subject")
        .ordered(PROBES_STREAM, why="the replay before consuming")
    )
    breaker.slot_durables(ConsumerSpec.of(durables.BREAKER))

    recovery = (
        User("recovery", "recovery: recovery actions; panic mode is announced as a critical FailureDetected")
        .pub(stem(RecoveryExecuted), stem(FailureDetected), deadletter("recovery"), why="what it owns")
        .basics()
        .ordered(EVENTS_STREAM, why="the state feed")
        .durable(pull(EVENTS_STREAM, WORK_DURABLE), push=False)
        .pub(f"$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}", why="the last recovery of an instance")
        .pub(
            f"$KV.{CLAIMS_BUCKET}.>",
            f"$JS.API.DIRECT.GET.KV_{CLAIMS_BUCKET}",
            f"$JS.API.DIRECT.GET.KV_{CLAIMS_BUCKET}.>",
            f"$JS.API.STREAM.MSG.GET.KV_{CLAIMS_BUCKET}",
            why="at-most-once claims",
        )
    )

    reporter = (
        User("reporter", "reporter: everything into ClickHouse; publishes only its dead letters")
        .pub(deadletter("reporter"), why="what it owns")
        .basics()
    )
    for spec in consumer_specs(ReporterSettings(clickhouse_url="chdb://")):
        reporter.durable(spec)

    alerter = (
        User("alerter", "alerter: alerts from failure, health, recovery and breaker events")
        .pub(
            one_token(AlertChanged),
            one_token(NotificationLogged),
            one_token(SilenceCreated),
            deadletter("alerter"),
            why="what it owns: alerts, its notification log, maintenance-window silences",
        )
        .basics()
        .ordered(f"KV_{SETTINGS_BUCKET}", why="watching the alerting settings")
        .ordered(EVENTS_STREAM, why="the replay before consuming")
        .slot_durables(ALERTER_CONSUMER)
    )

    admin = (
        User(
            "admin",
            "admin: `autoserve apply` (creates streams and buckets, writes the config), status, events, breaker, "
            "alerts",
        )
        .pub("$JS.API.>", "$JS.FC.>", f"$KV.{APPS_BUCKET}.>", f"$KV.{SETTINGS_BUCKET}.>", f"{PREFIX}.rpc.>")
        .pub(one_token(AlertAcknowledged), one_token(SilenceCreated), why="`autoserve alerts ack` and `silence`")
    )
    operator = User(
        "operator",
        "operator: read-only, live events only",
        subscribe=[f"{PREFIX}.event.>"],
        inbox=False,
        deny_publish=True,
    )
    client = User("client", "client: a user's service asking the breaker (BreakerClient: allow, report)").pub(
        BREAKER_ALLOW_RPC, BREAKER_REPORT_WILDCARD
    )
    return [prober, detector, breaker, recovery, reporter, alerter, admin, operator, client]


HEADER = """\
# AutoServe Health: nats-server with JetStream and one least-privilege user per service.
# GENERATED by scripts/gen_nats_conf.py from the code (subjects, streams, each service's
# consumers and buckets): do not edit; run `make deploy-config`.
#
# Passwords are never in this file: each `$AUTOSERVE_<USER>_PASSWORD` is read from the
# server's environment, as a plain password or a bcrypt hash (`nats server passwd`; a value
# starting with `$2a$` is compared as bcrypt). See deploy/README.md.
#
# Scope: publishing is allowed per subject, which keeps a service from writing another's
# events. Reading a stream is allowed per stream (a JetStream consumer may be created on
# it), so a service that may read AUTOSERVE_EVENTS may read all of it. Replies are private:
# each user subscribes only to its own inbox prefix, _INBOX_<user>.> (its clients set
# AUTOSERVE_NATS_INBOX_PREFIX=_INBOX_<user>), and the breaker answers requests through
# allow_responses (once per request it received), not through a grant on any inbox.

listen: "127.0.0.1:4222"   # in a container: -a 0.0.0.0 on the command line
server_name: autoserve-nats
max_payload: 1MB

# The store directory comes from the command line: -sd /var/lib/nats (every deploy file
# passes it), so one config serves systemd, compose, Kubernetes and the tests.
jetstream {
  max_file_store: 10GB
}

# TLS is optional. Uncomment; clients then use a tls:// URL and AUTOSERVE_NATS_TLS_CA
# (plus AUTOSERVE_NATS_TLS_CERT and _KEY when verify is true: mutual TLS).
# tls {
#   cert_file: "/etc/autoserve/tls/server.pem"
#   key_file:  "/etc/autoserve/tls/server-key.pem"
#   ca_file:   "/etc/autoserve/tls/ca.pem"
#   verify:    false
#   timeout:   2
# }

authorization {
  users: [
"""


def render() -> str:
    return HEADER + "".join(u.render() for u in users()) + "  ]\n}\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make deploy-config`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
