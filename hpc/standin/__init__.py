"""The stand-in model server (`python -m hpc.standin`): OpenAI-compatible, no GPU, for fast
tests, the demo and benchmarks. Where it differs from vLLM, that is a bug in the stand-in."""
