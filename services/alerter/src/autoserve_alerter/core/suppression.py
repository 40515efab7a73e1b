"""Silences, maintenance windows and dependency suppression: why an alert is held back.

A silence comes as a ``SilenceCreated`` (``autoserve alerts silence``, or a maintenance
window that began: ``open_windows`` decides those from the config's cron schedules). An
alert is also held back while a dependency of its app (transitively) has active alerts; it
is then reported under the deepest one, the root cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autoserve_config import AlertingConfig, AppSpec, parse_duration
from autoserve_config.cron import Cron, parse_cron
from autoserve_events import Event, SilenceCreated, derived_event_id

from .alerts import AlertBook, AlertView

SILENCE_KEPT = 86400.0  # an ended silence is forgotten this long after its end
MAX_WINDOW_STARTS = 1000  # looked-up window starts remembered (one per window and minute)


@dataclass(frozen=True)
class Silence:
    silence_id: str
    app: str
    instance: str
    starts_at: float
    ends_at: float
    created_by: str
    reason: str
    maintenance: bool
    window: str

    @classmethod
    def of(cls, e: SilenceCreated) -> Silence:
        return cls(e.silence_id, e.app_name, e.instance_id, e.starts_at, e.ends_at, e.created_by, e.reason,
                   e.maintenance, e.window)  # fmt: skip

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def covers(self, alert: AlertView) -> bool:
        return self.app == alert.app and self.instance in ("", alert.instance)

    def why(self) -> str:
        if self.maintenance:
            return f"maintenance window {self.window or self.silence_id}"
        return f"silenced by {self.silence_id} ({self.created_by}: {self.reason})"


@dataclass(frozen=True)
class Window:
    name: str
    cron: Cron
    duration: float
    apps: tuple[str, ...]
    reason: str


class Suppression:
    def __init__(self, book: AlertBook) -> None:
        self.book = book
        self.silences: dict[str, Silence] = {}
        self.windows: tuple[Window, ...] = ()
        self._window_starts: dict[tuple[str, int], float | None] = {}  # (window, minute) -> start
        self.depends_on: dict[str, tuple[str, ...]] = {}

    def configure(self, config: AlertingConfig) -> None:
        self.windows = tuple(
            Window(w.name, parse_cron(w.schedule, w.timezone), parse_duration(w.duration), tuple(w.apps), w.reason)
            for w in config.maintenance_windows
        )
        self._window_starts.clear()

    def set_apps(self, apps: dict[str, AppSpec]) -> None:
        self.depends_on = {name: tuple(spec.depends_on) for name, spec in apps.items() if spec.depends_on}

    def apply(self, e: SilenceCreated) -> None:
        self.silences[e.silence_id] = Silence.of(e)

    # -- why an alert is held back -------------------------------------------------------------

    def why(self, alert: AlertView, now: float) -> str | None:
        for silence in self.silences.values():
            if silence.covers(alert) and silence.active(now):
                return silence.why()
        root = self.failing_root(alert.app)
        if root is not None:
            return f"dependency {root} is failing"
        return None

    def failing_root(self, app: str) -> str | None:
        """The deepest dependency of ``app`` that has active alerts, if any."""
        seen = {app}

        def visit(name: str) -> str | None:
            for dep in self.depends_on.get(name, ()):
                if dep in seen:
                    continue
                seen.add(dep)
                deeper = visit(dep)
                if deeper is not None:
                    return deeper
                if self.book.active_in(dep):
                    return dep
            return None

        return visit(app)

    def dependents(self, apps: set[str]) -> tuple[tuple[AlertView, str], ...]:
        """The alerts held back under a root cause among ``apps``, with it."""
        if not self.depends_on or not apps:
            return ()
        found = []
        for app in sorted(self.depends_on):
            root = self.failing_root(app)
            if root in apps:
                found += [(AlertView.of(self.book.alerts[i]), root) for i in sorted(self.book.active_in(app))]
        return tuple(found)

    # -- time ----------------------------------------------------------------------------------

    def tick(self, now: float, apps: tuple[str, ...], emit: Callable[[Event], None]) -> None:
        """Open the maintenance windows that began (a silence for each app, ``apps`` where a
        window names none), and forget silences that ended a day ago."""
        for window in self.windows:
            start = self._window_start(window, now)
            if start is None:
                continue
            for app in window.apps or apps:
                silence_id = derived_event_id("maintenance", window.name, app, start)[:16]
                if silence_id not in self.silences:
                    emit(SilenceCreated(
                        event_id=derived_event_id(silence_id), silence_id=silence_id, app_name=app,
                        starts_at=start, ends_at=start + window.duration, created_by="alerting.maintenance_windows",
                        reason=window.reason or f"maintenance window {window.name}", timestamp=now,
                        maintenance=True, window=window.name,
                    ))  # fmt: skip
        for silence_id, silence in list(self.silences.items()):
            if now - silence.ends_at > SILENCE_KEPT:
                del self.silences[silence_id]

    def _window_start(self, window: Window, now: float) -> float | None:
        """The start of ``window``'s occurrence open at ``now``, if one is; looked up once a minute."""
        key = (window.name, int(now // 60))
        if key not in self._window_starts:
            if len(self._window_starts) > MAX_WINDOW_STARTS:
                self._window_starts.clear()
            start = window.cron.last_start(now, window.duration)
            self._window_starts[key] = start if start is not None and now < start + window.duration else None
        return self._window_starts[key]

    def due(self, now: float) -> list[float]:
        """A silence's start or end (what it held back is decided then); the next minute
        while maintenance windows are configured (a window is looked for once a minute)."""
        due = [(now // 60 + 1) * 60] if self.windows else []
        due += [s.ends_at for s in self.silences.values() if s.starts_at <= now < s.ends_at]
        due += [s.starts_at for s in self.silences.values() if now < s.starts_at]
        return due
