"""Where requests go: the Upstream interface, OpenAI-compatible providers, and HPC sites over
the SSH hop (its client and connection), the live model catalog and request tracing."""
