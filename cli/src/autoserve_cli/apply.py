"""``autoserve apply``: store a validated config in the KV buckets, declaratively.

Each app's spec goes under its name in ``autoserve-apps``; an unchanged spec is not
rewritten (no needless revision, no worker restarts); an app no longer in the file is
removed. The detector thresholds go to ``autoserve-settings``. The streams and buckets get
``AUTOSERVE_STREAM_REPLICAS`` replicas (1, 3 or 5): run apply again with another value to move
them in place; services never change them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from autoserve_config import Config, encode_app_spec, encode_detector
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET
from autoserve_runtime import ReplicasError, connect, live_keys, provision, stream_replicas


@dataclass
class ApplySummary:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{name}: {', '.join(apps)}" for name, apps in vars(self).items() if apps]
        return "; ".join(parts) or "no apps"


async def store_config(js: JetStreamContext, config: Config) -> ApplySummary:
    summary = ApplySummary()
    kv = await js.key_value(APPS_BUCKET)
    existing = set(await live_keys(js, APPS_BUCKET))
    for name, spec in config.apps.items():
        data = encode_app_spec(spec)
        try:
            current = (await kv.get(name)).value
        except KeyNotFoundError:
            current = None
        if current == data:
            summary.unchanged.append(name)
            continue
        await kv.put(name, data)
        (summary.updated if current is not None else summary.created).append(name)
    for name in sorted(existing - config.apps.keys()):
        await kv.delete(name)
        summary.removed.append(name)
    settings = await js.key_value(SETTINGS_BUCKET)
    await settings.put("detector", encode_detector(config.detector))
    await settings.put("alerting", msgspec.json.encode(config.alerting))  # the alerter follows it
    return summary


async def apply_config(config: Config, nats_url: str) -> int:
    try:
        replicas = stream_replicas()
    except ReplicasError as exc:
        print(f"autoserve apply: {exc}; nothing applied", file=sys.stderr)
        return 2
    nc = await connect(nats_url, "autoserve-apply", timeout=10)
    try:
        js = nc.jetstream()
        try:
            moved = await provision(js, durables=True, replicas=replicas)  # before anything publishes
        except ReplicasError as exc:
            print(f"autoserve apply: {exc}", file=sys.stderr)
            return 2
        print(f"applied to {nats_url}: {await store_config(js, config)}")
        if moved:
            print("replicas: " + ", ".join(f"{name} {was} -> {now}" for name, (was, now) in sorted(moved.items())))
    finally:
        await nc.close()
    return 0
