"""Throw-away local infrastructure for the demo and the tests.

Slurm, sshd, PostgreSQL and the vLLM CPU venv, each started and stopped by pid.
"""
