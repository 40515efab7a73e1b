"""The detector's adapters: configuration from KV."""
