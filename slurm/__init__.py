"""Job script templates rendered by hpc.jobs.script; shipped as package data."""
