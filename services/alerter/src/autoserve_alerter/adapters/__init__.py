"""Adapters: receivers (webhook, Slack, email, Alertmanager), dispatch, settings."""
