"""AutoServe Health breaker service: one circuit breaker per (app, instance)."""
