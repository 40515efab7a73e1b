"""Thin adapters: NATS subscriptions and the KV config watch."""
