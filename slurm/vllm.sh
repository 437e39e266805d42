# vLLM's OpenAI-compatible server for one node (basic form; see hpc.job_script ARG_BUILDERS).
if ((${#SAIA_SERVER_COMMAND[@]})); then
    SAIA_VLLM=("${SAIA_SERVER_COMMAND[@]}")
else
    SAIA_VLLM=(vllm serve)
fi
saia_serve "${SAIA_VLLM[@]}" "$SAIA_MODEL" \
    --host "$SAIA_BIND_HOST" \
    --port "$SAIA_PORT" \
    "${SAIA_SERVER_ARGS[@]}"
