"""Tests of hub/usage/."""
