"""AutoServe prober: HTTP/TCP health checks published as ProbeCompleted events."""
