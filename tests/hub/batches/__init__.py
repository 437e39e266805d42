"""Tests of hub/batches/."""
