# Prologue shared by every saia job template (sourced text, not run on its own).
# Expects the variables hpc.jobs.script writes above it: SAIA_STATE_DIR, SAIA_SERVICE,
# SAIA_BIND_HOST, SAIA_ADVERTISE_HOST, SAIA_PYTHON, SAIA_CONTAINER, SAIA_STOP_TIMEOUT and
# the arrays SAIA_SERVER_ARGS, SAIA_SERVER_COMMAND, SAIA_CONTAINER_BINDS.

# Whatever the job and its server create (key, endpoint, caches, vLLM's and Ray's sockets
# and shared memory) is for the service account alone.
umask 077
export SAIA_JOB_ID="${SLURM_JOB_ID:?saia: not started by Slurm or the local executor}"
export SAIA_JOB_DIR="$SAIA_STATE_DIR/jobs/$SAIA_JOB_ID"
mkdir -p "$SAIA_JOB_DIR"
chmod 700 "$SAIA_JOB_DIR"
# The job's output file is <state_dir>/jobs/<id>.log (Slurm cannot create folders); Slurm
# opens it with the submitter's umask, so it is narrowed here.
chmod 600 "$SAIA_STATE_DIR/jobs/$SAIA_JOB_ID.log" 2>/dev/null || true
ln -sfn "../$SAIA_JOB_ID.log" "$SAIA_JOB_DIR/job.log"
# A job Slurm requeued (or a job id Slurm reused after wrapping) runs in the same folder:
# the stop of the last run is over, and its address is no longer where a server listens.
rm -f "$SAIA_JOB_DIR/stopping" "$SAIA_JOB_DIR/endpoint.json"

# 32 random bytes as hex (keys and tokens; read from files, never from argv).
saia_random_hex() {
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

# A random key per job keeps other users of the node off the backend port. The server reads
# it from VLLM_API_KEY (never argv, which `ps` shows); the agent reads the file, which is
# written before endpoint.json. vLLM checks it only on /v1 paths, so the server also gets
# slurm/saia_backend_auth.py (copied from SAIA_AUTH_MODULE into the job dir) as middleware,
# which requires it on every path.
SAIA_GUARD_ARGS=()
if [[ "${SAIA_MAKE_API_KEY:-}" == 1 ]]; then
    saia_random_hex >"$SAIA_JOB_DIR/api_key"
    VLLM_API_KEY="$(<"$SAIA_JOB_DIR/api_key")"
    export VLLM_API_KEY
    mkdir -p "$SAIA_JOB_DIR/python"
    printf '%s' "${SAIA_AUTH_MODULE:?saia: the job script lacks the auth module}" \
        >"$SAIA_JOB_DIR/python/saia_backend_auth.py"
    export PYTHONPATH="$SAIA_JOB_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
    SAIA_GUARD_ARGS=(--middleware saia_backend_auth.BackendKeyMiddleware)
fi
if [[ -z "$SAIA_ADVERTISE_HOST" ]]; then
    SAIA_ADVERTISE_HOST="$(hostname -f 2>/dev/null || hostname)"
    export SAIA_ADVERTISE_HOST
fi

# TLS between the agent and the server (backend_tls): a fresh EC P-256 key and self-signed
# certificate for this job alone, valid for the job's time limit (SAIA_TLS_DAYS), both 0600
# in the job's private dir. The certificate's SHA-256 goes into endpoint.json; the agent
# trusts this certificate and nothing else for this job (docs/security.md), so the name in
# it is for people reading it, not for checking.
SAIA_TLS_ARGS=()
SAIA_TLS_SHA256=""
saia_san_entry() {
    if [[ "$1" =~ ^[0-9.]+$ || "$1" == *:* ]]; then
        echo "IP:$1"
    else
        echo "DNS:$1"
    fi
}
saia_make_certificate() {
    local dir="$SAIA_JOB_DIR/tls" address san
    mkdir -p "$dir"
    chmod 700 "$dir"
    rm -f "$dir/key.pem" "$dir/cert.pem" # a requeued job's run gets its own
    san="$(saia_san_entry "$SAIA_ADVERTISE_HOST")"
    address="$(hostname -I 2>/dev/null | awk '{print $1}')" || address=""
    if [[ -n "$address" && "$address" != "$SAIA_ADVERTISE_HOST" ]]; then
        san="$san,IP:$address"
    fi
    if ! timeout 60 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" -days "${SAIA_TLS_DAYS:-1}" \
        -subj "/CN=$SAIA_ADVERTISE_HOST" -addext "subjectAltName=$san" \
        -addext "basicConstraints=critical,CA:FALSE" 2>"$dir/openssl.err"; then
        echo "saia: openssl could not make the job's TLS certificate:" \
            "$(tr '\n' ' ' <"$dir/openssl.err")" >&2
        exit 1
    fi
    chmod 600 "$dir/key.pem" "$dir/cert.pem"
    SAIA_TLS_SHA256="$(openssl x509 -in "$dir/cert.pem" -noout -fingerprint -sha256 |
        sed 's/.*=//; s/://g' | tr 'A-F' 'a-f')"
    SAIA_TLS_ARGS=(--ssl-keyfile "$dir/key.pem" --ssl-certfile "$dir/cert.pem")
}
if [[ "${SAIA_BACKEND_TLS:-}" == 1 ]]; then
    saia_make_certificate
fi
# The agent's router keeps an idle connection to the server 30 s (its HttpClient's
# keepalive_expiry); vLLM (and the stand-in) would close it after 5 s. Longer here, so the
# router closes first and an idle gap under 30 s costs no new TCP and TLS handshake.
export VLLM_HTTP_TIMEOUT_KEEP_ALIVE="${VLLM_HTTP_TIMEOUT_KEEP_ALIVE:-35}"

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

# Write endpoint.json atomically (tmp + mv) so the agent never reads half a file; 0600,
# the agent refuses any other mode.
saia_write_endpoint() {
    local tmp="$SAIA_JOB_DIR/.endpoint.json.$$" tls=', "scheme": "http"'
    if [[ -n "$SAIA_TLS_SHA256" ]]; then
        tls=', "scheme": "https", "tls_sha256": "'"$SAIA_TLS_SHA256"'"'
    fi
    printf '{"host": "%s", "port": %d, "job_id": "%s"%s}\n' \
        "$SAIA_ADVERTISE_HOST" "$SAIA_PORT" "$SAIA_JOB_ID" "$tls" >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$SAIA_JOB_DIR/endpoint.json"
}

# The inodes of the TCP sockets (IPv4 and IPv6) listening on port $1, one a line.
saia_listeners() {
    local -a tables=()
    local table
    for table in /proc/net/tcp /proc/net/tcp6; do
        [[ -r "$table" ]] && tables+=("$table")
    done
    # Columns: sl local_address(HEXIP:HEXPORT) rem_address st(0A = LISTEN) ... inode(10th)
    awk -v port="$(printf '%04X' "$1")" \
        '$4 == "0A" { n = split($2, a, ":"); if (a[n] == port) print $10 }' "${tables[@]}"
}

# The socket inodes open in process $1 or any of its descendants, one a line.
saia_tree_sockets() {
    local pid
    for pid in $(ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            tree[root] = 1; print root
            do { grew = 0
                for (p in parent) if (!(p in tree) && (parent[p] in tree)) {
                    tree[p] = 1; grew = 1; print p } } while (grew) }'); do
        # A process may end meanwhile; its sockets are then no one's.
        find "/proc/$pid/fd" -maxdepth 1 -lname 'socket:*' -printf '%l\n' 2>/dev/null |
            sed 's/^socket:\[\(.*\)\]$/\1/' || true
    done
}

# Wait until the server's own processes hold every socket listening on the port, so the
# endpoint the agent probes (with the job's key) is really ours: another user of the node
# could bind a free port first. 0: ours; 1: the server ended or the job is stopping;
# 2: someone else listens on it (seen twice, so not a socket closing meanwhile).
saia_wait_listening() {
    local listeners owned inode foreign strikes=0
    while kill -0 "$SAIA_SERVER_PID" 2>/dev/null && [[ -z "${SAIA_STOPPING:-}" ]]; do
        listeners="$(saia_listeners "$SAIA_PORT")"
        if [[ -n "$listeners" ]]; then
            owned="$(saia_tree_sockets "$SAIA_SERVER_PID")"
            foreign=0
            for inode in $listeners; do
                grep -qx "$inode" <<<"$owned" || foreign=1
            done
            if ((foreign == 0)); then
                return 0
            fi
            strikes=$((strikes + 1))
            if ((strikes >= 2)); then
                return 2
            fi
        fi
        sleep 1
    done
    return 1
}

# Whether the server still accepts connections on its port.
saia_server_listening() {
    local host="$SAIA_BIND_HOST"
    if [[ -z "$host" || "$host" == 0.0.0.0 || "$host" == "::" ]]; then
        host=127.0.0.1
    fi
    (exec 3<>"/dev/tcp/$host/$SAIA_PORT") 2>/dev/null
}

# Forward a stop signal to the server, wait for it (bounded), then make sure it is gone.
# Slurm (scancel, time limit, preemption) and the local executor signal every process of
# the job, the server too, and a second SIGTERM makes uvicorn servers (vLLM, the stand-in)
# abandon their open requests: forward only when the server still listens a moment later,
# i.e. the signal reached this shell alone (e.g. `scancel --batch`), or when it has not
# published its endpoint yet (still loading: no requests to lose, and not listening yet).
saia_stop() {
    trap '' TERM INT # one graceful stop; Slurm's own SIGKILL follows KillWait anyway
    SAIA_STOPPING=1
    echo "saia: SIG$1 received, stopping the server (pid $SAIA_SERVER_PID)" >&2
    # Tells the agent at its next look that this job is going (preemption, time limit, an
    # admin's scancel): it takes the job out of rotation and replaces it at once, and a
    # job stopped before it served is no failed start (hpc/scheduler/observation.py).
    echo "SIG$1 $(date +%s)" >"$SAIA_JOB_DIR/stopping" 2>/dev/null || true
    sleep 0.5
    if [[ -z "${SAIA_PUBLISHED:-}" ]] || saia_server_listening; then
        kill -TERM "$SAIA_SERVER_PID" 2>/dev/null || true
    fi
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
    local listening=0
    saia_wait_listening || listening=$?
    if ((listening == 0)); then
        saia_write_endpoint
        SAIA_PUBLISHED=1
    elif ((listening == 2)); then
        echo "saia: another process listens on port $SAIA_PORT; not publishing it" >&2
        saia_stop TERM
        wait "$SAIA_SERVER_PID" || true
        exit 1
    fi
    local status=0 stopped_before="${SAIA_STOPPING:-}"
    wait "$SAIA_SERVER_PID" || status=$?
    if [[ -z "$stopped_before" && -n "${SAIA_STOPPING:-}" ]]; then
        # `wait` returned early for the trapped signal; this one gives the server's status.
        # (A stop while waiting for the port was handled before the first `wait`.)
        status=0
        wait "$SAIA_SERVER_PID" || status=$?
    fi
    # The port is no longer ours: nobody may be sent there in the server's name.
    rm -f "$SAIA_JOB_DIR/endpoint.json"
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
        "${SAIA_GUARD_ARGS[@]}" \
        "${SAIA_TLS_ARGS[@]}" \
        "${SAIA_SERVER_ARGS[@]}"
}
