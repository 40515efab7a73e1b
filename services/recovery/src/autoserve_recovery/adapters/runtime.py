"""The values the runtimes speak, under their old address: they live in ``ports.py`` now.
(``adapters/health.py`` still imports ``Member`` from here.)"""

from __future__ import annotations

from ..ports import AwaitHealthy, Member, Outcome, RecoveryError, Runtime

__all__ = ["AwaitHealthy", "Member", "Outcome", "RecoveryError", "Runtime"]
