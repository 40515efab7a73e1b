"""The breaker's pure core: no I/O, no asyncio, time passed in. State is a fold of events."""
