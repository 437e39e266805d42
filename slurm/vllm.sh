# vLLM's OpenAI-compatible server on one node (options from hpc.jobs.vllm_args).
saia_vllm_environment
saia_serve_vllm
