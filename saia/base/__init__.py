"""The floor the hub and the agent both stand on, and nothing else of the project.

The wire protocol and the stream multiplexer that both ends of the SSH hop speak, the
HTTP/1.1 client both use towards model servers and providers, durations in Slurm's and the
config files' formats, and the config-file helpers. Modules here import only the standard
library, third-party packages and each other: never hub/, hpc/ or the rest of saia/ (the
import contract in pyproject.toml checks it).
"""
