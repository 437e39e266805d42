# The stand-in model server (hpc.standin.server): OpenAI-compatible, no GPU, for tests and the demo.
if ((${#SAIA_SERVER_COMMAND[@]})); then
    SAIA_STANDIN=("${SAIA_SERVER_COMMAND[@]}")
else
    SAIA_STANDIN=("$SAIA_PYTHON" -m hpc.standin)
fi
# Like vLLM, the stand-in checks VLLM_API_KEY on /v1 by itself; the job's middleware on
# every path.
SAIA_STANDIN_KEY_ARGS=()
if [[ -n "${VLLM_API_KEY:-}" ]]; then
    SAIA_STANDIN_KEY_ARGS=(--api-key-env VLLM_API_KEY)
fi
saia_serve "${SAIA_STANDIN[@]}" \
    --host "$SAIA_BIND_HOST" \
    --port "$SAIA_PORT" \
    --model-name "$SAIA_SERVED_MODEL_NAME" \
    "${SAIA_STANDIN_KEY_ARGS[@]}" \
    "${SAIA_GUARD_ARGS[@]}" \
    "${SAIA_TLS_ARGS[@]}" \
    "${SAIA_SERVER_ARGS[@]}"
