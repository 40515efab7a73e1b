"""AutoServe Health alerter: notifications with routing, grouping, escalation and silences."""
