# Prologue shared by every saia job template (sourced text, not run on its own).
# Expects the variables hpc.jobs.script writes above it: SAIA_STATE_DIR, SAIA_SERVICE,
# SAIA_BIND_HOST, SAIA_ADVERTISE_HOST, SAIA_PYTHON, SAIA_CONTAINER, SAIA_STOP_TIMEOUT and
# the arrays SAIA_SERVER_ARGS, SAIA_SERVER_COMMAND, SAIA_CONTAINER_BINDS.

export SAIA_JOB_ID="${SLURM_JOB_ID:?saia: not started by Slurm or the local executor}"
export SAIA_JOB_DIR="$SAIA_STATE_DIR/jobs/$SAIA_JOB_ID"
mkdir -p "$SAIA_JOB_DIR"
# The job's output file is <state_dir>/jobs/<id>.log (Slurm cannot create folders).
ln -sfn "../$SAIA_JOB_ID.log" "$SAIA_JOB_DIR/job.log"
# A random key per job keeps other users of the node off the backend port. The server reads
# it from VLLM_API_KEY (never argv, which `ps` shows); the agent reads the file, which is
# written before endpoint.json.
if [[ "${SAIA_MAKE_API_KEY:-}" == 1 ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SAIA_JOB_DIR/api_key")
    VLLM_API_KEY="$(<"$SAIA_JOB_DIR/api_key")"
    export VLLM_API_KEY
fi
if [[ -z "$SAIA_ADVERTISE_HOST" ]]; then
    SAIA_ADVERTISE_HOST="$(hostname -f 2>/dev/null || hostname)"
    export SAIA_ADVERTISE_HOST
fi

# A TCP port nobody listens on right now (the server binds it a moment later).
saia_free_port() {
    if "$SAIA_PYTHON" -c 'import socket
s = socket.socket()
s.bind(("", 0))
print(s.getsockname()[1])' 2>/dev/null; then
        return 0
    fi
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "saia: no free port found" >&2
    return 1
}

SAIA_PORT="$(saia_free_port)"
export SAIA_PORT

# Write endpoint.json atomically (tmp + mv) so the agent never reads half a file.
saia_write_endpoint() {
    local tmp="$SAIA_JOB_DIR/.endpoint.json.$$"
    printf '{"host": "%s", "port": %d, "job_id": "%s"}\n' \
        "$SAIA_ADVERTISE_HOST" "$SAIA_PORT" "$SAIA_JOB_ID" >"$tmp"
    mv -f "$tmp" "$SAIA_JOB_DIR/endpoint.json"
}

# Forward a stop signal to the server, wait for it (bounded), then make sure it is gone.
saia_stop() {
    trap '' TERM INT # one graceful stop; Slurm's own SIGKILL follows KillWait anyway
    SAIA_STOPPING=1
    echo "saia: SIG$1 received, stopping the server (pid $SAIA_SERVER_PID)" >&2
    kill -TERM "$SAIA_SERVER_PID" 2>/dev/null || true
    local ticks=$((SAIA_STOP_TIMEOUT * 10))
    while kill -0 "$SAIA_SERVER_PID" 2>/dev/null && ((ticks > 0)); do
        sleep 0.1
        ticks=$((ticks - 1))
    done
    if kill -0 "$SAIA_SERVER_PID" 2>/dev/null; then
        echo "saia: server still running after ${SAIA_STOP_TIMEOUT}s, killing it" >&2
        kill -KILL "$SAIA_SERVER_PID" 2>/dev/null || true
    fi
}

# saia_wrap CMD [ARGS...]: sets SAIA_WRAPPED to CMD, inside `apptainer exec` with a container.
saia_wrap() {
    SAIA_WRAPPED=("$@")
    if [[ -n "$SAIA_CONTAINER" ]]; then
        local -a binds=()
        local bind
        for bind in "${SAIA_CONTAINER_BINDS[@]}"; do
            binds+=(--bind "$bind")
        done
        SAIA_WRAPPED=(apptainer exec --nv "${binds[@]}" "$SAIA_CONTAINER" "$@")
    fi
}

# saia_serve CMD [ARGS...]: run the model server, publish its endpoint, stop it on SIGTERM.
saia_serve() {
    saia_wrap "$@"
    local -a command=("${SAIA_WRAPPED[@]}")
    echo "saia: job $SAIA_JOB_ID serves $SAIA_SERVICE on $SAIA_ADVERTISE_HOST:$SAIA_PORT" >&2
    "${command[@]}" &
    SAIA_SERVER_PID=$!
    trap 'saia_stop TERM' TERM
    trap 'saia_stop INT' INT
    saia_write_endpoint
    local status=0
    wait "$SAIA_SERVER_PID" || status=$?
    if [[ -n "${SAIA_STOPPING:-}" ]]; then
        # `wait` returned early for the trapped signal; this one gives the server's status.
        status=0
        wait "$SAIA_SERVER_PID" || status=$?
    fi
    echo "saia: server exited with status $status" >&2
    exit "$status"
}

# Both vLLM templates: models come from disk or HF_HOME (compute nodes usually have no
# internet, so the hub is offline unless the service's environment says HF_HUB_OFFLINE=0),
# vLLM's compile cache is per job unless the operator shares one (VLLM_CACHE_ROOT), and
# SAIA_VLLM is the server command: `vllm serve` or the service's server_command.
saia_vllm_environment() {
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    if [[ -n "$SAIA_HF_HOME" ]]; then
        export HF_HOME="$SAIA_HF_HOME"
    fi
    export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$SAIA_JOB_DIR/vllm-cache}"
    if ((${#SAIA_SERVER_COMMAND[@]})); then
        SAIA_VLLM=("${SAIA_SERVER_COMMAND[@]}")
    else
        SAIA_VLLM=(vllm serve)
    fi
}

# The vLLM server of the job on this node (after saia_vllm_environment).
saia_serve_vllm() {
    saia_serve "${SAIA_VLLM[@]}" "$SAIA_MODEL" \
        --host "$SAIA_BIND_HOST" \
        --port "$SAIA_PORT" \
        "${SAIA_SERVER_ARGS[@]}"
}
