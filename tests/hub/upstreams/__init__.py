"""Tests of hub/upstreams/."""
