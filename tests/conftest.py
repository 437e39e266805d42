"""Shared fixtures live in tests/fixtures/ as plugins, one module per real component."""

pytest_plugins = [
    "tests.fixtures.slurm",
    "tests.fixtures.sshd",
    "tests.fixtures.postgres",
    "tests.fixtures.vllm",
    "tests.fixtures.standin",
]
