"""Batch inference jobs: the agent's side of the hub's /v1/batches (docs/batches.md)."""
