"""The agent's configuration: one YAML file, validated at start.

Every validation problem becomes one line `FILE: KEY: REASON` (`saia/base/config_file.py`), so an
operator can fix a config without reading a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hpc.config_slurm import (
    Placement,
    SlurmResources,
    placement_problem,
    resolve_placements,
)
from saia.base.config_file import (
    NO_FILE,
    ConfigError,
    Duration,
    Strict,
    read_yaml,
    validate,
)
from saia.base.endpoints import Endpoint
from saia.base.tracing import TracingConfig

__all__ = [
    "AgentConfig",
    "BatchConfig",
    "ConfigError",
    "FairnessConfig",
    "Placement",
    "RouterConfig",
    "ServiceConfig",
    "SlurmResources",
    "VllmOptions",
    "load_config",
    "parse_config",
]

# The endpoints a service serves by default, from what its server does (`vllm.task`).
TASK_ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {
    "generate": ("chat", "completions", "responses", "messages", "tokenize"),
    "embed": ("embeddings", "tokenize"),
    "score": ("rerank", "score", "tokenize"),
    "transcription": ("transcriptions", "translations"),
}
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class VllmOptions(Strict):
    """Options of the default `vllm` template; None leaves vLLM's own default."""

    max_model_len: int | None = Field(None, ge=16)
    """--max-model-len: longest context"""
    quantization: str | None = None
    """--quantization, e.g. awq or fp8"""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """--gpu-memory-utilization (0-1]"""
    dtype: str | None = None
    """--dtype, e.g. bfloat16"""
    chat_template: str | None = None
    """--chat-template: a file path or template text"""
    tool_call_parser: str | None = None
    """--tool-call-parser, e.g. hermes"""
    enable_auto_tool_choice: bool = False
    """--enable-auto-tool-choice (needs tool_call_parser)"""
    task: Literal["generate", "embed", "score", "transcription"] = "generate"
    """what the server does; sets the default endpoints (embed and score: --runner pooling)"""
    enforce_eager: bool = False
    """--enforce-eager: no CUDA graphs (faster start, slower decoding)"""
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    """--scheduling-policy; priority: the router passes batch requests a lower priority"""
    ray_port: int | None = Field(
        None, ge=1024, le=65535, description="Ray head port (multi-node); None: a free one"
    )
    ray_join_timeout: Duration = Field(
        300.0, gt=0, description="wait this long for every node to join Ray (multi-node)"
    )

    @model_validator(mode="after")
    def _tool_choice(self) -> VllmOptions:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        return self


class ServiceConfig(Strict):
    """One model service: the model id clients use and how its jobs are run."""

    name: str
    """the model id clients use (letters, digits and . _ : / -)"""
    model: str = Field(description="model path or name given to the server")
    served_model_name: str | None = None
    """the id the server announces, if it differs from name"""
    template: str = Field("vllm", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    """job template in slurm/: vllm, vllm-multinode or standin"""
    resources: SlurmResources = Field(default_factory=SlurmResources)
    """what each job asks Slurm for"""
    placements: list[Placement] = Field(default_factory=list)
    """where jobs may queue; each goes where Slurm predicts the soonest start; empty: resources'"""
    replace_pending_gain: Duration = Field(300.0, gt=0)
    """move a pending job (once) to another placement predicted to start this much sooner"""
    min_instances: int = Field(1, ge=0, le=64)
    """jobs kept running even without load (0 allows scale to zero)"""
    max_instances: int = Field(1, ge=0, le=64)
    """upper bound of jobs for this service"""
    target_concurrency: int = Field(8, ge=1, description="in-flight requests per instance")
    queueing: Literal["fair", "fifo"] = "fair"
    """order of requests waiting for a slot: fair across users (router.fairness), or arrival"""
    renewal_lead: Duration = Field(
        600.0, description="submit the replacement this long before the limit"
    )
    startup_timeout: Duration = Field(900.0, gt=0)
    """a running job not ready within this is cancelled and replaced"""
    look_back: Duration = Field(
        60.0, ge=0, description="load window: the target follows the highest load seen in it"
    )
    scale_down_delay: Duration = Field(
        300.0, ge=0, description="stop an instance only after the load stayed lower this long"
    )
    startup_backoff: Duration = Field(
        30.0, ge=0, description="wait after a failed start; doubles per failure in a row"
    )
    startup_backoff_max: Duration = Field(
        900.0, ge=0, description="upper bound of the wait between failed starts"
    )
    server_args: list[str] = Field(default_factory=list)
    """extra arguments appended to the server's command line"""
    server_command: list[str] | None = Field(
        None, description="program (argv) the template starts instead of its default server"
    )
    environment: dict[str, str] = Field(default_factory=dict)
    """environment variables set in the job"""
    container: str | None = Field(None, description="Apptainer image; None runs on the host")
    container_binds: list[str] = Field(default_factory=list)
    """extra Apptainer bind mounts (SRC[:DST[:OPTS]])"""
    hf_home: str | None = Field(
        None, description="HF_HOME of the job (bound into the container); offline by default"
    )
    api_key: bool = Field(
        True, description="protect the backend with a random per-job key (VLLM_API_KEY)"
    )
    backend_tls: bool = Field(
        True,
        description=(
            "TLS between the agent and the job's server, pinned to a fresh per-job "
            "certificate (docs/security.md); off only for a server built without ssl, or "
            "where the measured CPU cost matters more than the cluster network's privacy"
        ),
    )
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    """options of the vllm templates"""
    display_name: str | None = None
    """name shown to chat users in /v1/models"""
    input: list[str] = Field(default_factory=lambda: ["text"])
    """input modalities announced in /v1/models, e.g. [text, image]"""
    output: list[str] = Field(default_factory=lambda: ["text"])
    """output modalities announced in /v1/models, e.g. [text, thought]"""
    endpoints: list[Endpoint] | None = None
    """endpoints served, published in /v1/models and enforced by the router; None: vllm.task's"""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters (model id -> path) the service's jobs load, each its own model id"""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SERVICE_NAME.match(value):
            raise ValueError("use letters, digits and . _ : / - (at most 128, no leading symbol)")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: dict[str, str]) -> dict[str, str]:
        return {cls._name(name): path for name, path in value.items()}

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ServiceConfig:
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be >= min_instances")
        if self.renewal_lead >= self.resources.time_min_seconds:
            which = "time_min" if self.resources.time_min else "time_limit"
            raise ValueError(f"renewal_lead must be shorter than resources.{which}")
        problem = placement_problem(self.candidates, self.min_instances)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def candidates(self) -> tuple[Placement, ...]:
        """The placements with every field resolved (one named "" without a list)."""
        return resolve_placements(self.placements, self.resources)

    def placed(self, name: str) -> ServiceConfig:
        """This service with the placement's partition/QOS/reservation in its resources
        (what a job submitted there asks for); "" is the service as configured."""
        if not name:
            return self
        for placement in self.candidates:
            if placement.name == name:
                update = {
                    "partition": placement.partition,
                    "qos": placement.qos,
                    "reservation": placement.reservation,
                }
                resources = self.resources.model_copy(update=update)
                return self.model_copy(update={"resources": resources})
        raise ValueError(f"service {self.name!r} has no placement {name!r}")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.name

    @property
    def served_endpoints(self) -> tuple[Endpoint, ...]:
        if self.endpoints is not None:
            return tuple(self.endpoints)
        return TASK_ENDPOINTS[self.vllm.task]


class FairnessConfig(Strict):
    """How the router shares a busy service's backend slots among users (docs/architecture.md)."""

    key_weights: dict[str, float] = Field(default_factory=dict)
    """share weight per hub key id (default 1); a key's weight wins over its group's"""
    group_weights: dict[str, float] = Field(default_factory=dict)
    """share weight per group (default 1) for each user of the group"""
    batch_keys: list[str] = Field(default_factory=list)
    """hub key ids whose requests are always of the batch class"""
    batch_every: int = Field(8, ge=2, le=1000)
    """while batch requests wait, at least one of this many dispatches goes to batch"""
    max_queue_per_user: int = Field(128, ge=1)
    """requests of one user (or key) waiting per service; more get 429"""

    @field_validator("key_weights", "group_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not 0.01 <= weight <= 100:
                raise ValueError(f"the weight of {name!r} must be within 0.01 and 100")
        return value


class RouterConfig(Strict):
    """How the agent's router treats requests."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """largest request body accepted (413 beyond)"""
    queue_timeout: Duration = Field(300.0, ge=0, description="wait this long for a ready backend")
    max_queue: int = Field(
        4096,
        ge=0,
        description="requests waiting per service (each user at most "
        "fairness.max_queue_per_user); more get 503 queue_full",
    )
    connect_timeout: Duration = Field(5.0, gt=0)
    """connecting to a backend"""
    first_byte_timeout: Duration = Field(600.0, gt=0)
    """from sending the request to the response head"""
    idle_timeout: Duration = Field(300.0, gt=0, description="longest gap between two chunks")
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    """fair queueing across users, weights and the batch class"""


class BatchAccount(Strict):
    """The Slurm account and QOS batch jobs of a user or group are charged to."""

    account: str | None = None
    """--account of the batch job; None: the service's"""
    qos: str | None = None
    """--qos of the batch job; None: batch.qos"""


class BatchConfig(Strict):
    """Batch inference jobs (/v1/batches on the hub): one Slurm job per batch."""

    accounts: dict[str, BatchAccount] = Field(default_factory=dict)
    """account and QOS by the hub's identity: `user:NAME`, `group:NAME` (a user's entry first)"""
    qos: str | None = None
    """--qos of batch jobs no entry names (e.g. a low-priority batch QOS)"""
    nice: int = Field(1000, ge=0, le=2147483645)
    """--nice of batch jobs: they start after the interactive services' jobs"""
    seconds_per_request: float = Field(2.0, gt=0)
    """the job's --time is estimated as load_time + requests * this / parallel"""
    parallel: int = Field(8, ge=1, description="requests a batch job runs at once (estimate)")
    load_time: Duration = Field(600.0, ge=0, description="time to load the model (estimate)")
    min_time: Duration = Field(600.0, gt=0, description="shortest --time of a batch job")
    max_time: Duration = Field(86400.0, gt=0, description="longest --time of a batch job")
    concurrency: int = Field(64, ge=1, description="requests the job's driver keeps in flight")
    request_timeout: Duration = Field(600.0, gt=0, description="one request's answer at most")
    stop_grace: Duration = Field(5.0, ge=0, description="in-flight requests' time after SIGTERM")
    max_attempts: int = Field(4, ge=1, description="jobs per batch: the first and resubmissions")


class AgentConfig(Strict):
    """The whole agent configuration file."""

    state_dir: Path
    """the agent's files (state, job dirs and logs, agent.sock), on a file system nodes share"""
    executor: Literal["slurm", "local"] = "slurm"
    """slurm (production) or local (job scripts as local processes, for machines without Slurm)"""
    slurm_bin_dir: Path | None = None
    """directory of sbatch/squeue/scancel if they are not on PATH"""
    slurm_conf: Path | None = None
    """SLURM_CONF for the Slurm commands, if not the system default"""
    job_prefix: str = Field("saia", pattern=r"^[a-z][a-z0-9-]{0,15}$")
    """job names are <job_prefix>-<service>; with the comment tag they mark the agent's jobs"""
    poll_interval: Duration = Field(5.0, gt=0)
    """how often the agent observes Slurm and decides"""
    health_interval: Duration = Field(5.0, gt=0)
    """how often every backend is probed"""
    health_timeout: Duration = Field(3.0, gt=0)
    """per probe"""
    health_failures: int = Field(3, ge=1)
    """failed probes in a row before a backend is replaced"""
    max_total_gpus: int | None = Field(None, ge=0)
    """cap on GPUs held by all services together"""
    slurm_timeout: Duration = Field(30.0, gt=0)
    """per Slurm command"""
    placement_probe_interval: Duration = Field(60.0, gt=0)
    """ask Slurm (sbatch --test-only) where a service's next job would start at most this often"""
    python: str | None = Field(
        None, description="python on the compute nodes; default: the agent's"
    )
    backend_bind_host: str = Field("0.0.0.0", description="address model servers in jobs listen on")
    backend_advertise_host: str | None = Field(
        None, description="address the router uses to reach a job; default: the node's hostname -f"
    )
    router: RouterConfig = Field(default_factory=RouterConfig)
    """how the router treats requests"""
    services: list[ServiceConfig] = Field(default_factory=list)
    """the model services"""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """batch jobs (the hub's /v1/batches)"""
    tracing: TracingConfig | None = None
    """OpenTelemetry spans of routed requests, joined to the hub's traces; off if absent"""
    metrics_textfile: Path | None = None
    """node_exporter textfile (*.prom, absolute path) rewritten after every loop; off if absent"""
    job_retention: Duration = Field(7 * 86400.0, gt=0)
    """an ended job's folder and log stay in <state_dir>/jobs/ this long; its vLLM cache 10 min"""

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        seen: set[str] = set()
        for service in self.services:
            for key in [*{service.name, service.model_id}, *service.adapters]:
                if key in seen:
                    raise ValueError(f"service name {key!r} is used twice")
                seen.add(key)
        return self

    def service(self, name: str) -> ServiceConfig | None:
        for service in self.services:
            if name in (service.name, service.model_id) or name in service.adapters:
                return service  # an adapter's requests go to its base service's backends
        return None


def parse_config(data: Any, source: Path | str = NO_FILE) -> AgentConfig:
    return validate(AgentConfig, data, source, relative_paths=("state_dir",))


def load_config(path: Path | str) -> AgentConfig:
    return parse_config(read_yaml(Path(path)), Path(path))
