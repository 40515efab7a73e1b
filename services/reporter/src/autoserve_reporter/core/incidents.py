"""Incidents: failure -> recovery -> healthy, folded from the audit trail of one app.

Per instance, in time order:

- the first ``FailureDetected`` (or an unhealthy ``HealthChanged``) with no incident open
  starts a *candidate* at its timestamp;
- the candidate becomes an incident when the instance turns unhealthy or a recovery runs
  for it. A candidate that is neither within ``confirm_seconds`` (the detector's window)
  was a transient blip (one failed probe below the threshold) and is dropped;
- recoveries attach to the open incident;
- it ends at the next healthy ``HealthChanged``; if it never turned unhealthy (a recovery
  fixed it before the threshold), at the end of its first successful recovery.

``time_to_recover_s`` is end minus start; the strategy credited is the last successful
remediation before the end (else the last successful traffic action; ``none`` if the
instance came back by itself).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

DEFAULT_CONFIRM_SECONDS = 600.0


class AuditRow(msgspec.Struct, frozen=True):
    """The columns of ``events`` the fold needs, in ``INCIDENT_COLUMNS`` order."""

    instance_id: str
    timestamp: float
    type: str
    event_id: str
    failure_type: str
    strategy: str
    success: bool | None
    healthy: bool | None
    duration_ms: float | None


INCIDENT_COLUMNS = tuple(AuditRow.__struct_fields__)


class Recovery(msgspec.Struct):
    strategy: str
    success: bool
    timestamp: float
    duration_ms: float | None


class Incident(msgspec.Struct):
    instance_id: str
    started_at: float
    failure_type: str
    failures: int
    became_unhealthy: bool
    recoveries: list[Recovery]
    status: str = "ongoing"  # ongoing | recovered
    recovered_at: float | None = None
    time_to_recover_s: float | None = None
    recovered_by: str | None = None


class StrategyStats(msgspec.Struct):
    strategy: str
    incidents: int
    avg_time_to_recover_s: float
    max_time_to_recover_s: float


class IncidentList(msgspec.Struct):
    app_name: str
    report_period_hours: float
    incidents: list[Incident]
    by_strategy: list[StrategyStats]


class _Open(msgspec.Struct):
    incident: Incident
    confirmed: bool = False


def fold_incidents(rows: Iterable[AuditRow], confirm_seconds: float = DEFAULT_CONFIRM_SECONDS) -> list[Incident]:
    """Incidents in start order; ``rows`` must be in time order."""
    open_: dict[str, _Open] = {}
    done: list[Incident] = []

    def drop_stale(instance: str, now: float) -> None:
        current = open_.get(instance)
        if current and not current.confirmed and now - current.incident.started_at > confirm_seconds:
            del open_[instance]

    for row in rows:
        drop_stale(row.instance_id, row.timestamp)
        current = open_.get(row.instance_id)
        if row.type == "FailureDetected" or (row.type == "HealthChanged" and row.healthy is False):
            if current is None:
                current = open_[row.instance_id] = _Open(
                    Incident(row.instance_id, row.timestamp, row.failure_type or "unhealthy", 0, False, [])
                )
            if row.type == "FailureDetected":
                current.incident.failures += 1
            else:
                current.incident.became_unhealthy = current.confirmed = True
        elif row.type == "RecoveryExecuted" and current is not None:
            current.confirmed = True
            current.incident.recoveries.append(
                Recovery(row.strategy, bool(row.success), row.timestamp, row.duration_ms)
            )
            if row.success and not current.incident.became_unhealthy and _is_remediation(row.strategy):
                _close(current.incident, row.timestamp + (row.duration_ms or 0.0) / 1000.0)
                done.append(open_.pop(row.instance_id).incident)
        elif row.type == "HealthChanged" and row.healthy and current is not None:
            if current.confirmed:
                _close(current.incident, row.timestamp)
                done.append(current.incident)
            del open_[row.instance_id]
    done.extend(o.incident for o in open_.values() if o.confirmed)
    return sorted(done, key=lambda i: (i.started_at, i.instance_id))


# Traffic actions (remove from LB, drain, redirect) hide a failure; they do not fix it.
_TRAFFIC = {"remove_from_lb", "drain_instance", "redirect_traffic"}


def _is_remediation(strategy: str) -> bool:
    return strategy not in _TRAFFIC


def _close(incident: Incident, at: float) -> None:
    incident.status = "recovered"
    incident.recovered_at = at
    incident.time_to_recover_s = max(0.0, at - incident.started_at)
    succeeded = [r.strategy for r in incident.recoveries if r.success and r.timestamp <= at]
    remedies = [s for s in succeeded if _is_remediation(s)]
    incident.recovered_by = (remedies or succeeded or ["none"])[-1]


def by_strategy(incidents: Iterable[Incident]) -> list[StrategyStats]:
    """Time to recover per strategy credited, over recovered incidents."""
    times: dict[str, list[float]] = {}
    for incident in incidents:
        if incident.time_to_recover_s is not None and incident.recovered_by is not None:
            times.setdefault(incident.recovered_by, []).append(incident.time_to_recover_s)
    return [StrategyStats(strategy, len(ts), sum(ts) / len(ts), max(ts)) for strategy, ts in sorted(times.items())]


def incident_list(
    app: str, hours: float, rows: Iterable[AuditRow], confirm_seconds: float = DEFAULT_CONFIRM_SECONDS
) -> IncidentList:
    incidents = fold_incidents(rows, confirm_seconds)
    return IncidentList(app, hours, incidents, by_strategy(incidents))
