"""What one probe attempt returns, whatever the protocol, and the shape of a protocol's
attempt function (one per protocol, listed in ``probe.Prober``). Pure: data and types only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .outcome import Verdict
from .target import Target


@dataclass(frozen=True, slots=True)
class Attempt:
    verdict: Verdict
    status_code: int | None = None
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


# One attempt at one target: it never raises, every failure is a Verdict.
AttemptFn = Callable[[Target], Awaitable[Attempt]]
