# vLLM's OpenAI-compatible server on one node (options from hpc.vllm_args).
# Models come from disk or HF_HOME: compute nodes usually have no internet, so the hub is
# offline unless the service's environment says HF_HUB_OFFLINE=0.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [[ -n "$SAIA_HF_HOME" ]]; then
    export HF_HOME="$SAIA_HF_HOME"
fi
# vLLM's compile cache per job unless the operator shares one (VLLM_CACHE_ROOT).
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$SAIA_JOB_DIR/vllm-cache}"
if ((${#SAIA_SERVER_COMMAND[@]})); then
    SAIA_VLLM=("${SAIA_SERVER_COMMAND[@]}")
else
    SAIA_VLLM=(vllm serve)
fi
saia_serve "${SAIA_VLLM[@]}" "$SAIA_MODEL" \
    --host "$SAIA_BIND_HOST" \
    --port "$SAIA_PORT" \
    "${SAIA_SERVER_ARGS[@]}"
