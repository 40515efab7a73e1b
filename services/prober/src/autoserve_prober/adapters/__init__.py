"""The prober's adapters: HTTP and TCP probes, KV and Docker target sources."""
