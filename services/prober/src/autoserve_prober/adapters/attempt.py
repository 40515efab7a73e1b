"""What one probe attempt returns, whatever the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.outcome import Verdict


@dataclass(frozen=True, slots=True)
class Attempt:
    verdict: Verdict
    status_code: int | None = None
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
