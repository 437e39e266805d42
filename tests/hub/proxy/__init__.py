"""Tests of hub/proxy/."""
