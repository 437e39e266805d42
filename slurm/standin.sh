# The stand-in model server (hpc.standin.server): OpenAI-compatible, no GPU, for tests and the demo.
if ((${#SAIA_SERVER_COMMAND[@]})); then
    SAIA_STANDIN=("${SAIA_SERVER_COMMAND[@]}")
else
    SAIA_STANDIN=("$SAIA_PYTHON" -m hpc.standin)
fi
saia_serve "${SAIA_STANDIN[@]}" \
    --host "$SAIA_BIND_HOST" \
    --port "$SAIA_PORT" \
    --model-name "$SAIA_SERVED_MODEL_NAME" \
    "${SAIA_SERVER_ARGS[@]}"
