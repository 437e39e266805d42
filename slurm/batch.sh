# A batch job (hpc.batch.script): slurm/saia_batch_driver.py starts the service's model
# server in the job and sends it the batch's input, appending each answer to output.jsonl
# or errors.jsonl as it arrives (a rerun skips what they hold). The exit status goes to
# <batch dir>/exit_code, which is how the agent tells a finished batch from a job that
# stopped. Expects SAIA_BATCH_DIR, SAIA_STATE_DIR, the array SAIA_BATCH_RUNNER (the
# driver's argv), the driver's text in SAIA_BATCH_DRIVER and, for a service with a backend
# key, the middleware's in SAIA_AUTH_MODULE from the lines above.
umask 077
export SAIA_JOB_ID="${SLURM_JOB_ID:?saia: not started by Slurm or the local executor}"
chmod 600 "$SAIA_STATE_DIR/jobs/$SAIA_JOB_ID.log" 2>/dev/null || true
cd "$SAIA_BATCH_DIR"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$SAIA_BATCH_DIR/vllm-cache}"
if [[ -n "${SAIA_HF_HOME:-}" ]]; then
    export HF_HOME="$SAIA_HF_HOME"
fi

saia_batch_exit() {
    printf '%s\n' "$1" >"$SAIA_BATCH_DIR/.exit_code.$$"
    mv -f "$SAIA_BATCH_DIR/.exit_code.$$" "$SAIA_BATCH_DIR/exit_code"
}

printf '%s' "${SAIA_BATCH_DRIVER:?saia: the job script lacks the batch driver}" \
    >"$SAIA_BATCH_DIR/saia_batch_driver.py"
if [[ -n "${SAIA_AUTH_MODULE:-}" ]]; then
    # the server's key middleware (slurm/saia_backend_auth.py), as in serving jobs
    mkdir -p "$SAIA_BATCH_DIR/python"
    printf '%s' "$SAIA_AUTH_MODULE" >"$SAIA_BATCH_DIR/python/saia_backend_auth.py"
    export PYTHONPATH="$SAIA_BATCH_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "saia: batch job $SAIA_JOB_ID runs $SAIA_BATCH_DIR" >&2
"${SAIA_BATCH_RUNNER[@]}" &
SAIA_RUNNER_PID=$!
# scancel, the time limit, preemption and the deadline send SIGTERM: the driver stops
# sending, gives the requests in flight a grace, keeps what it wrote, and its status is
# recorded all the same (the agent resubmits a batch with requests left).
trap 'kill -TERM "$SAIA_RUNNER_PID" 2>/dev/null || true' TERM INT
status=0
wait "$SAIA_RUNNER_PID" || status=$?
while kill -0 "$SAIA_RUNNER_PID" 2>/dev/null; do
    status=0
    wait "$SAIA_RUNNER_PID" || status=$?
done
saia_batch_exit "$status"
exit "$status"
