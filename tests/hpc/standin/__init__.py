"""Tests of hpc/standin/."""
