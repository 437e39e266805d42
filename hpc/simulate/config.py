"""What the simulator models: the cluster (Slurm's queue, preemptions, a GPU cap), the
services (the agent's own `ServiceConfig`) and how fast one instance serves.

A YAML file (`saia hpc simulate --config FILE`) overrides the defaults; without one the
defaults below describe one 1-GPU service on a busy shared partition.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from hpc.config import ServiceConfig
from hpc.simulate.client import ClientModel
from hpc.simulate.queue_sample import read_waits
from saia.base.config_file import NO_FILE, ConfigError, Duration, Strict, read_yaml, validate

__all__ = [
    "BaselineModel",
    "ClientModel",
    "ConfigError",
    "InstanceModel",
    "QueueModel",
    "SimConfig",
    "load_sim_config",
]

DEFAULT_SERVICE = "sim-model"


class QueueModel(Strict):
    """How long Slurm keeps a job of one partition (or partition/QOS) pending: log-normal;
    optionally how many GPUs our jobs may hold in it at once, and its own preemption rate."""

    median: Duration = Field(120.0, ge=0, description="median start wait")
    p95: Duration = Field(600.0, ge=0, description="95th percentile of the start wait")
    gpus: int | None = Field(None, ge=0, description="GPUs ours may hold at once; None: any")
    preemptions_per_gpu_hour: float | None = Field(None, ge=0)
    """this queue's rate (a preemptible partition or QOS); None: the world's"""
    waits: list[float] = Field(default_factory=list)
    """recorded start waits (s) to draw from instead (filled from `queue_sample`)"""

    @model_validator(mode="after")
    def _order(self) -> QueueModel:
        if self.p95 < self.median:
            raise ValueError("p95 must be >= median")
        return self

    def sample(self, rng: random.Random) -> float:
        if self.waits:
            return rng.choice(self.waits)
        if self.median <= 0:
            return 0.0
        if self.p95 <= self.median:
            return self.median
        sigma = math.log(self.p95 / self.median) / 1.645  # z of the 95th percentile
        return rng.lognormvariate(math.log(self.median), sigma)


class InstanceModel(Strict):
    """How one running job of a service serves."""

    load_time: Duration = Field(180.0, ge=0, description="from job start to ready (model load)")
    concurrency: int = Field(16, ge=1, description="requests one instance runs at once")
    tokens_per_s: float = Field(25.0, gt=0, description="output tokens/s of each running request")
    prefill_tokens_per_s: float = Field(4000.0, gt=0, description="prompt tokens/s (first token)")


class BaselineModel(Strict):
    """The baseline's own knobs where they differ from the services' (`baseline:`): the
    reference system run as its operators would run it while the agent's policy is tuned,
    or the other way round. Unset: the service's own value."""

    min_instances: int | None = Field(None, ge=0, le=64)
    target_concurrency: int | None = Field(None, ge=1, description="its per-instance capacity")

    def apply(self, service: ServiceConfig) -> ServiceConfig:
        update = {k: v for k, v in self.model_dump().items() if v is not None}
        if not update:
            return service
        data = {**service.model_dump(), **update}
        data["max_instances"] = max(data["max_instances"], data["min_instances"])
        return ServiceConfig.model_validate(data)


class SimConfig(Strict):
    """The whole simulated world."""

    services: list[ServiceConfig] = Field(default_factory=list)
    """the services, as in the agent's config (default: one 1-GPU service)"""
    instance: dict[str, InstanceModel] = Field(default_factory=dict)
    """per service name: how an instance serves (default: InstanceModel())"""
    queues: dict[str, QueueModel] = Field(default_factory=dict)
    """start wait per `partition` or `partition/qos`; `default` for the rest"""
    queue_sample: str | None = None
    """a file of recorded waits (hpc/simulate/queue_sample.py), relative to this config"""
    preemptions_per_gpu_hour: float = Field(0.02, ge=0)
    """chance per GPU-hour that Slurm preempts a running job"""
    max_total_gpus: int | None = Field(8, ge=0)
    """the agent's cap on GPUs held by all services"""
    poll_interval: Duration = Field(5.0, gt=0, description="the agent's loop period")
    health_failures: int = Field(3, ge=1)
    queue_timeout: Duration = Field(300.0, ge=0, description="router: longest wait for a slot")
    max_queue: int = Field(4096, ge=0, description="router: requests waiting per service")
    estimate_error: float = Field(0.5, ge=0, le=3)
    """sigma of the log-normal error of Slurm's predicted starts (0: exact)"""
    placement_probe_interval: Duration = Field(60.0, gt=0)
    """the agent asks sbatch --test-only this often; an answer predicts the next job's wait"""
    client: ClientModel = Field(default_factory=ClientModel)
    """how clients retry a 503 (hpc/simulate/client.py)"""
    baseline: BaselineModel = Field(default_factory=BaselineModel)
    """the baseline's own min_instances / target_concurrency (default: the services')"""

    def fixed(self, placement: str) -> SimConfig:
        """This world with every service that has `placement` pinned to it (its only
        place): the fixed-partition run to compare predicted-start placement with."""
        services, found = [], False
        for service in self.services:
            if placement in {p.name for p in service.candidates}:
                placed = service.placed(placement)
                service = placed.model_copy(update={"placements": []})
                found = True
            services.append(service)
        if not found:
            raise ConfigError(f"--fixed {placement}: no service has a placement of that name")
        return self.model_copy(update={"services": services})

    def for_baseline(self) -> SimConfig:
        """This world with the baseline's own knobs in its services."""
        services = [self.baseline.apply(service) for service in self.services]
        return self.model_copy(update={"services": services})

    def service_names(self) -> list[str]:
        return [s.name for s in self.services]

    def instance_of(self, service: str) -> InstanceModel:
        return self.instance.get(service, InstanceModel())

    def queue_for(self, partition: str | None, qos: str | None) -> tuple[str, QueueModel]:
        """The queue a job asking for `partition` and `qos` waits in, and its key:
        `partition/qos`, else `partition`, else `default`, else the built-in model."""
        for key in (f"{partition}/{qos}", f"{partition}", "default"):
            if key in self.queues:
                return key, self.queues[key]
        return "", QueueModel()

    def preemption_rate(self, queue: QueueModel) -> float:
        rate = queue.preemptions_per_gpu_hour
        return self.preemptions_per_gpu_hour if rate is None else rate


def default_service(name: str = DEFAULT_SERVICE) -> ServiceConfig:
    """One 1-GPU vLLM service, 1 to 8 instances, 2 h jobs renewed 10 min ahead."""
    return ServiceConfig.model_validate(
        {
            "name": name,
            "model": "simulated",
            "resources": {"partition": "gpu", "gpus": 1, "time_limit": "2:00:00"},
            "min_instances": 1,
            "max_instances": 8,
            "target_concurrency": 8,
        }
    )


def default_config() -> SimConfig:
    return SimConfig(services=[default_service()])


def parse_sim_config(data: Any, source: Path | str = NO_FILE) -> SimConfig:
    config = validate(SimConfig, data, source)
    if not config.services:
        config = config.model_copy(update={"services": [default_service()]})
    return config


def load_sim_config(path: Path | None) -> SimConfig:
    """The file's settings over the defaults; ConfigError with one line per problem."""
    if path is None:
        return default_config()
    config = parse_sim_config(read_yaml(path), path)
    if config.queue_sample is None:
        return config
    return with_recorded_waits(config, read_waits(path.parent / config.queue_sample))


def with_recorded_waits(config: SimConfig, waits: dict[str, list[float]]) -> SimConfig:
    """Each recorded queue draws from its waits; a queue also in `queues` keeps its other
    settings (GPU limit, preemption rate)."""
    queues = dict(config.queues)
    for key, recorded in waits.items():
        model = queues.get(key, QueueModel())
        queues[key] = model.model_copy(update={"waits": recorded})
    return config.model_copy(update={"queues": queues})
