"""Which notifications a member sends that another may have sent already.

Delivery is at least once: a member logs a notification (``NotificationLogged``) after its
receiver took it, so a member that dies between the two leaves a notification sent and not
logged, and the member that takes its group over sends it again, with the same id. A
receiver that drops repeats of an id (our webhook inbox, Alertmanager) sees it once; Slack and
email show it twice. This fold says when that may have happened, for a counter and a log line:
a notification that fell due while another member (or this process's previous life) was the
group's owner, and was alive to send it.

Pure: the service tells it when ownership moved and until when each previous owner may have
acted (its last renewal seen, plus its TTL); time comes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .notification import Notification

OwnerOf = Callable[[str], str | None]


@dataclass
class Handover:
    me: str
    started_at: float  # wall clock: what fell due before this process ran may have been sent
    # group key -> until when its previous owner may have sent (wall clock)
    taken: dict[str, float] = field(default_factory=dict)

    def moved(self, keys: Iterable[str], before: OwnerOf, after: OwnerOf, alive_until: Callable[[str], float]) -> int:
        """Ownership changed: remember the groups this member took from another (the owner
        ``before`` of each key was someone else, ``after`` is this member); how many."""
        taken = 0
        for key in keys:
            previous = before(key)
            if after(key) == self.me and previous is not None and previous != self.me:
                self.taken[key] = max(self.taken.get(key, float("-inf")), alive_until(previous))
                taken += 1
        return taken

    def maybe_repeated(self, n: Notification) -> bool:
        """Whether a previous owner may have sent ``n`` already: it fell due while that owner
        could still act, or before this process started. Re-sends to Alertmanager are
        repeats by design and never counted."""
        if n.resend:
            return False
        due = n.created_at if n.due_at is None else n.due_at
        return due < self.started_at or due <= self.taken.get(n.group_key, float("-inf"))

    def forget(self, live: Iterable[str], now: float) -> None:
        """Drop the groups that are gone, and takeovers nothing can be due before any more."""
        keep = set(live)
        self.taken = {k: until for k, until in self.taken.items() if k in keep and until >= now - FORGET_AFTER}


FORGET_AFTER = 24 * 3600.0  # a group waiting longer than this for its flush is not one that moved
