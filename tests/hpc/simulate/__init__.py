"""Tests of hpc/simulate/."""
