"""Thin adapters: ClickHouse (clickhouse-connect), migrations, batching, the HTTP API."""
