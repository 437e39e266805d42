"""Tests of hpc/batch/ (the agent's batch jobs)."""
