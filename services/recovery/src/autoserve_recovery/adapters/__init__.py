"""Thin adapters: Docker, local processes, nginx, KV claims."""
