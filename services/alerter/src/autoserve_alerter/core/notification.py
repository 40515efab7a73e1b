"""What the core hands the dispatcher: notifications, and the events decided with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from autoserve_events import Event, NotificationLogged
from autoserve_events.catalogue import NotificationOutcome

from .alerts import AlertView

NotificationStatus = Literal["firing", "resolved"]
Emit = Callable[[Event], None]  # folds a decided event and queues it for publishing
Owns = Callable[[str], bool]  # whether this member is the active one for a key (a group's, say)
RESEND_TIER = -1  # in-flight key of a re-send: it is no group's tier
InFlight = set[tuple[str, str, int]]  # (group key, receiver, tier): a delivery not yet ended


@dataclass(frozen=True)
class Notification:
    """One message for one receiver: what ``group_key`` has firing and resolved now."""

    notification_id: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    route_id: str
    tier: int
    seq: int
    app_name: str
    firing: tuple[AlertView, ...]
    resolved: tuple[AlertView, ...]
    # Alerts of apps that depend on a failing app here: held back, reported under it.
    dependents: tuple[tuple[AlertView, str], ...]
    created_at: float
    # Alertmanager receivers: firing alerts are valid this long from when they are sent (endsAt).
    valid_for: float | None = None
    # A re-send of what an Alertmanager receiver was told (not logged: not a notification).
    resend: bool = False
    retry_for: float | None = None  # bounds the receiver's retry_for (a re-send: until the next)
    # When it fell due (a flush's or a tier's time): a member that took its group over after
    # that moment may repeat what the previous owner sent and had not yet logged.
    due_at: float | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.group_key, self.receiver, RESEND_TIER if self.resend else self.tier)

    @property
    def status(self) -> NotificationStatus:
        return "firing" if self.firing else "resolved"

    def logged(
        self, outcome: NotificationOutcome, now: float, attempts: int = 1, error: str | None = None
    ) -> NotificationLogged:
        return NotificationLogged(
            event_id=self.notification_id,
            receiver=self.receiver,
            group_key=self.group_key,
            outcome=outcome,
            timestamp=now,
            app_name=self.app_name,
            tier=self.tier,
            seq=self.seq,
            firing=[a.alert_id for a in self.firing],
            resolved=[a.alert_id for a in self.resolved],
            attempts=attempts,
            error=error,
        )


def everything(_key: str) -> bool:
    """One member alone owns every key."""
    return True


@dataclass
class Decisions:
    events: list[Event] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
