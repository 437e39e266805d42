"""saia: serve large language models from an HPC cluster to the web."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saia")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
