"""Following the configuration in KV: every app's newest valid spec, and the settings.

A value that does not validate (written straight into KV, say) must not cost an app its
monitoring, in this process or one started later. So the newest earlier revision that
does validate is used instead: the one in memory while following, else the newest in the
key's KV history (the buckets keep 5), never reaching back past a delete. Each refused
value is logged with the app, its revision and its problems (never the value: it may hold
a secret), and counted; an app with no valid revision left is not monitored, and says so
as an error and in ``autoserve_config_invalid_keys{outcome="none"}``. Readiness is not
touched: the service still works for every other app.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.js.errors import NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from autoserve_config import AppSpec, ConfigError, DetectorConfig, decode_app_spec, parse_config
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET

from .observability import add_counter, add_gauge

log = structlog.get_logger("autoserve.config")

T = TypeVar("T")

# What a watcher does for a key whose latest value is invalid.
LAST_GOOD = "last_good"  # an earlier valid revision is in use
NO_VALID = "none"  # nothing valid: the app is not monitored (settings: the defaults)

# Process-wide, for /metrics: values refused per (bucket, key), and each live watcher's
# keys whose latest value is invalid (a process may run several watchers, as tests do).
REJECTED: Counter[tuple[str, str]] = Counter()
_WATCHING: dict[int, tuple[str, dict[str, str]]] = {}


def _invalid_keys() -> dict[tuple[str, str], float]:
    worst: dict[tuple[str, str], str] = {}
    for bucket, invalid in _WATCHING.values():
        for key, outcome in invalid.items():
            if worst.get((bucket, key)) != NO_VALID:
                worst[(bucket, key)] = outcome
    counts = {(bucket, outcome): 0.0 for bucket, _ in _WATCHING.values() for outcome in (LAST_GOOD, NO_VALID)}
    for (bucket, _), outcome in worst.items():
        counts[(bucket, outcome)] += 1
    return counts


add_gauge("config_invalid_keys", "KV config keys whose latest value does not validate, by what is used instead "
          "(last_good: an earlier valid revision; none: nothing, the app is not monitored)", _invalid_keys,
          ("bucket", "outcome"))  # fmt: skip
add_counter("config_rejected", "KV config values that did not validate", lambda: dict(REJECTED), ("bucket", "key"))


@contextmanager
def _watching(bucket: str) -> Iterator[dict[str, str]]:
    invalid: dict[str, str] = {}
    _WATCHING[id(invalid)] = (bucket, invalid)
    try:
        yield invalid
    finally:
        del _WATCHING[id(invalid)]


def newest_valid(history: Sequence[KeyValue.Entry], below: int, decode: Callable[[bytes], T]) -> tuple[int, T] | None:
    """The newest revision under ``below`` that decodes, with what it decodes to; a delete
    ends the search (an app removed on purpose is not brought back by a bad write)."""
    for entry in sorted(history, key=lambda e: e.revision or 0, reverse=True):
        if (entry.revision or 0) >= below:
            continue
        if entry.operation in (KV_DEL, KV_PURGE):
            return None
        try:
            return entry.revision or 0, decode(entry.value or b"")
        except ConfigError:
            continue
    return None


async def _from_history(kv: KeyValue, key: str, below: int, decode: Callable[[bytes], T]) -> tuple[int, T] | None:
    try:
        history = await kv.history(key)
    except NoKeysError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        log.error("cannot read the key's history for a valid revision", key=key, error=str(exc) or type(exc).__name__)
        return None
    return newest_valid(history, below, decode)


@dataclass
class _Key:
    """One followed key: its bucket, what it is called in logs, and what missing it means."""

    kv: KeyValue
    bucket: str
    invalid: dict[str, str]  # key -> outcome, for the gauge
    name: str  # log field: "app" or "key"
    without: str  # what happens with no valid revision


async def _fallback(
    key: _Key, entry: KeyValue.Entry, problems: list[str], kept: tuple[int, T] | None, decode: Callable[[bytes], T]
) -> tuple[int, T] | None:
    """What to use for ``entry.key`` now that its latest value is refused: the last good
    value in memory, else the newest valid one in its history; logged and counted."""
    revision = entry.revision or 0
    REJECTED[(key.bucket, entry.key)] += 1
    found = kept or await _from_history(key.kv, entry.key, revision, decode)
    key.invalid[entry.key] = LAST_GOOD if found else NO_VALID
    names = {key.name: entry.key, "revision": revision, "problems": problems}
    if found:
        log.error("invalid config value refused; using the newest valid earlier revision", **names,
                  using_revision=found[0])  # fmt: skip
    else:
        log.error(f"invalid config value refused and no valid earlier revision: {key.without}", **names)
    return found


# (apps, when the change was written or None for the initial load)
OnApps = Callable[[dict[str, AppSpec], float | None], None]


async def follow_apps(kv: KeyValue, on_change: OnApps) -> None:
    apps: dict[str, tuple[int, AppSpec]] = {}  # app -> (revision, spec) in use
    synced = False
    watcher = await kv.watchall()
    with _watching(APPS_BUCKET) as invalid:
        follow = _Key(kv, APPS_BUCKET, invalid, "app", "the app is NOT monitored")
        async for entry in watcher:
            if entry is None:  # end of the current values: apply them all at once
                synced = True
                on_change(_specs(apps), None)
                continue
            key = entry.key
            if entry.operation in (KV_DEL, KV_PURGE):
                invalid.pop(key, None)  # removed on purpose: nothing is missing
                if apps.pop(key, None) is None:
                    continue
                log.info("app removed", app=key)
            else:
                try:
                    spec = decode_app_spec(key, entry.value or b"")
                except ConfigError as exc:
                    kept = apps.get(key)
                    found = await _fallback(follow, entry, exc.problems, kept, _app_decoder(key))
                    if found is None or found is kept:
                        continue  # nothing changes
                    apps[key] = found
                else:
                    if invalid.pop(key, None):
                        log.info("app spec valid again", app=key, revision=entry.revision)
                    apps[key] = (entry.revision or 0, spec)
                    log.info("app spec loaded", app=key, revision=entry.revision)
            if synced:
                on_change(_specs(apps), entry.created.timestamp() if entry.created else None)


def _specs(apps: dict[str, tuple[int, AppSpec]]) -> dict[str, AppSpec]:
    return {name: spec for name, (_, spec) in apps.items()}


def _app_decoder(app: str) -> Callable[[bytes], AppSpec]:
    return lambda data: decode_app_spec(app, data)


def decode_setting(key: str, data: bytes) -> Any:
    """The settings bucket's ``key`` (``detector``, ``alerting``), validated as that section of the file."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError([f"{key}: not valid JSON: {exc}"]) from None
    return getattr(parse_config({key: raw}), key)


async def follow_setting(
    kv: KeyValue, key: str, defaults: Callable[[], T], on_change: Callable[[T], None], *, defaults_first: bool = False
) -> None:
    """One key of the settings bucket: its newest valid value (see above), else the defaults.
    The first call is the stored value, or the defaults when none is valid, so a service that
    waits for its settings starts with them; ``defaults_first`` announces the defaults before
    the key is read, for a service that does not wait."""
    current: tuple[int, T] | None = None
    announced = False

    def announce(settings: T) -> None:
        nonlocal announced
        announced = True
        on_change(settings)

    def decode(data: bytes) -> T:
        return decode_setting(key, data)

    watcher = await kv.watch(key)
    if defaults_first:
        announce(defaults())
    with _watching(SETTINGS_BUCKET) as invalid:
        follow = _Key(kv, SETTINGS_BUCKET, invalid, "key", "the defaults are in use")
        async for entry in watcher:
            if entry is None:  # the stored value is read
                if not announced:
                    announce(defaults())
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                invalid.pop(entry.key, None)
                current = None
                announce(defaults())
                continue
            try:
                settings = decode(entry.value or b"")
            except ConfigError as exc:
                found = await _fallback(follow, entry, exc.problems, current, decode)
                if found is not None and found is not current:
                    current = found
                    announce(found[1])
                continue
            invalid.pop(entry.key, None)
            current = (entry.revision or 0, settings)
            announce(settings)


async def follow_detector_settings(kv: KeyValue, on_change: Callable[[DetectorConfig], None]) -> None:
    """The detector does not wait for its settings: the defaults until the key says otherwise."""
    await follow_setting(kv, "detector", DetectorConfig, on_change, defaults_first=True)
