"""Tests of hpc/jobs/."""
