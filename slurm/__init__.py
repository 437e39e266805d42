"""Job script templates rendered by hpc.job_script; shipped as package data."""
