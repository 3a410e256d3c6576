"""Celery wiring of the bridge: the app, its queues and the thin tasks."""
