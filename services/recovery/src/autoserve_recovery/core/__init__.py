"""The recovery service's pure core: strategy choice, escalation, budgets, backoff, the
ejection cap and panic mode, as a fold over events plus decisions. No I/O, time passed in."""

from .decide import (
    AppPolicy,
    Limits,
    Plan,
    backoff_delay,
    decide,
    left_out,
    panic,
    panic_announcement,
    panic_restores,
    record,
    restore_plan,
    rolling_member,
)
from .state import InstanceState, RecoveryState
from .strategies import DEFAULT_STRATEGY_MAP, LADDER, remediation_ladder, strategy_map, traffic_steps

__all__ = [
    "DEFAULT_STRATEGY_MAP",
    "LADDER",
    "AppPolicy",
    "InstanceState",
    "Limits",
    "Plan",
    "RecoveryState",
    "backoff_delay",
    "decide",
    "left_out",
    "panic",
    "panic_announcement",
    "panic_restores",
    "record",
    "remediation_ladder",
    "restore_plan",
    "rolling_member",
    "strategy_map",
    "traffic_steps",
]
