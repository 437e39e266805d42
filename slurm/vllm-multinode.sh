# vLLM across the job's nodes: a Ray cluster (the head on this batch node, one worker per
# other node, each started with srun) and `vllm serve` on the head, pipeline parallel over
# the nodes and tensor parallel over each node's GPUs (options from hpc.jobs.vllm_args).
# `ray` and `python3` are taken from PATH (or the container), like `vllm`; the service's
# environment can set SAIA_RAY, SAIA_RAY_PYTHON and SAIA_RAY_HEAD_IP.
saia_vllm_environment
SAIA_RAY="${SAIA_RAY:-ray}"
SAIA_RAY_PYTHON="${SAIA_RAY_PYTHON:-python3}"

SAIA_NODE_TEXT="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
mapfile -t SAIA_NODE_LIST <<<"$SAIA_NODE_TEXT"
SAIA_HEAD_NODE="${SAIA_NODE_LIST[0]}"
# `hostname -i` can say 127.0.1.1 on Debian; the first configured address reaches the head.
if [[ -z "${SAIA_RAY_HEAD_IP:-}" ]]; then
    SAIA_RAY_HEAD_IP="$(hostname -I | awk '{print $1}')"
fi
if [[ -z "$SAIA_RAY_PORT" ]]; then
    SAIA_RAY_PORT="$(saia_free_port)"
fi
export RAY_ADDRESS="$SAIA_RAY_HEAD_IP:$SAIA_RAY_PORT"
SAIA_RAY_PIDS=()

# The version `ray --version` prints ("ray, version 2.52.0"), empty if it says none.
saia_ray_version() {
    saia_wrap "$SAIA_RAY" --version
    timeout 60 "${SAIA_WRAPPED[@]}" 2>/dev/null |
        sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n 1 || true
}

# Ray listens on the head's routable address (GCS, raylet, object manager, agents): anyone
# who reaches those ports could run code as the service account. Ray 2.52+ checks a token
# on every RPC and HTTP entry point (RAY_AUTH_MODE=token); the job makes one per job, in a
# 0600 file (RAY_AUTH_TOKEN_PATH, never argv), which every node reads from the shared job
# dir. An older Ray has no authentication: the job refuses to start it open unless the
# service's environment says SAIA_RAY_ALLOW_NO_AUTH=1 (docs/security.md).
SAIA_RAY_VERSION="$(saia_ray_version)"
IFS=. read -r SAIA_RAY_MAJOR SAIA_RAY_MINOR _ <<<"${SAIA_RAY_VERSION:-0.0}"
if ((SAIA_RAY_MAJOR > 2 || (SAIA_RAY_MAJOR == 2 && SAIA_RAY_MINOR >= 52))); then
    saia_random_hex >"$SAIA_JOB_DIR/ray_token"
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$SAIA_JOB_DIR/ray_token"
elif [[ "${SAIA_RAY_ALLOW_NO_AUTH:-}" == 1 ]]; then
    echo "saia: Ray ${SAIA_RAY_VERSION:-?} has no token authentication (2.52+);" \
        "SAIA_RAY_ALLOW_NO_AUTH=1: starting it open" >&2
else
    echo "saia: Ray ${SAIA_RAY_VERSION:-?} has no token authentication (needs 2.52+);" \
        "refusing to start an open Ray cluster (SAIA_RAY_ALLOW_NO_AUTH=1 accepts the risk)" >&2
    exit 1
fi

# Stop Ray on every node when the job ends, however it ends (bounded; Slurm kills the rest).
saia_ray_stop() {
    local pid ticks=$((SAIA_STOP_TIMEOUT * 10))
    for pid in "${SAIA_RAY_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${SAIA_RAY_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((ticks > 0)); do
            sleep 0.1
            ticks=$((ticks - 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap saia_ray_stop EXIT
# Until saia_serve takes the stop signal over; a stop meanwhile (preemption while Ray
# starts) is noted for the agent as saia_stop does: no failed start.
trap 'echo "SIGTERM $(date +%s)" >"$SAIA_JOB_DIR/stopping" 2>/dev/null; exit 143' TERM INT

# How many Ray nodes are alive (empty while the head does not answer).
saia_ray_nodes() {
    saia_wrap "$SAIA_RAY_PYTHON" -c 'import ray
ray.init(address="auto", logging_level="ERROR")
print(sum(1 for node in ray.nodes() if node["Alive"]))'
    timeout 20 "${SAIA_WRAPPED[@]}" 2>/dev/null | tail -n 1 || true
}

saia_wrap "$SAIA_RAY" start --head --block --disable-usage-stats --include-dashboard=false \
    --node-ip-address="$SAIA_RAY_HEAD_IP" --port="$SAIA_RAY_PORT" \
    --num-gpus="$SAIA_GPUS_PER_NODE"
"${SAIA_WRAPPED[@]}" &
SAIA_RAY_PIDS+=($!)
saia_wrap "$SAIA_RAY" start --block --disable-usage-stats --address="$RAY_ADDRESS" \
    --num-gpus="$SAIA_GPUS_PER_NODE"
# Since Slurm 22.05 a step does not inherit the job's --cpus-per-task: pass it on, or Ray's
# workers on the other nodes would be confined to one CPU.
for node in "${SAIA_NODE_LIST[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        --kill-on-bad-exit=1 "${SAIA_WRAPPED[@]}" &
    SAIA_RAY_PIDS+=($!)
done

echo "saia: waiting for ${#SAIA_NODE_LIST[@]} nodes to join Ray at $RAY_ADDRESS" >&2
SAIA_RAY_DEADLINE=$((SECONDS + SAIA_RAY_JOIN_TIMEOUT))
while :; do
    joined="$(saia_ray_nodes)"
    if [[ "$joined" == "${#SAIA_NODE_LIST[@]}" ]]; then
        break
    fi
    for pid in "${SAIA_RAY_PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "saia: a Ray process (pid $pid) exited before the cluster formed" >&2
            exit 1
        fi
    done
    if ((SECONDS >= SAIA_RAY_DEADLINE)); then
        echo "saia: ${joined:-0} of ${#SAIA_NODE_LIST[@]} nodes joined Ray" \
            "within ${SAIA_RAY_JOIN_TIMEOUT}s" >&2
        exit 1
    fi
    sleep 2
done
echo "saia: Ray cluster of $joined nodes; head $SAIA_HEAD_NODE ($RAY_ADDRESS)" >&2

saia_serve_vllm
