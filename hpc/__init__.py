"""The login-node agent: Slurm-managed model services and the request router."""
