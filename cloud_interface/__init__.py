"""The forced command on the login node (stdlib only, Python 3.8+)."""
