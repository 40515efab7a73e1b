"""Helpers the test suites share that are not fixtures (those live in the conftest files)."""
