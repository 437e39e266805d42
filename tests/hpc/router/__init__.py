"""Tests of hpc/router/."""
