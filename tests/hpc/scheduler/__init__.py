"""Tests of hpc/scheduler/."""
