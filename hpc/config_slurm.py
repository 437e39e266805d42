"""The Slurm side of a service's configuration: what one job asks for (`SlurmResources`) and
where its jobs may be queued (`Placement`, resolved by `resolve_placements`).

Apart from `hpc/config.py` to keep both modules short; `hpc.config` re-exports the names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import Field, field_validator, model_validator

from saia.base.config_file import Strict
from saia.base.durations import parse_slurm_time

# Slurm options the agent owns: an operator setting them in extra_sbatch would break
# job recognition, logging or the graceful stop; partition, QOS and reservation come
# from the chosen placement.
RESERVED_SBATCH = (
    "--job-name",
    "-J",
    "--comment",
    "--output",
    "-o",
    "--error",
    "-e",
    "--signal",
    "--parsable",
    "--wrap",
    "--requeue",
    "--time-min",
)
PLACEMENT_NAME = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9._:/@+-]{0,63}$")


class SlurmResources(Strict):
    """What one job of a service asks Slurm for."""

    partition: str | None = None
    """Slurm partition (--partition); None uses the cluster's default"""
    nodes: int = Field(1, ge=1, le=64)
    """nodes per job; above 1 the vllm template runs a Ray cluster across them"""
    gpus: int = Field(1, ge=0, le=16, description="GPUs per node")
    cpus: int = Field(4, ge=1, le=1024, description="CPUs per task")
    memory: str = Field("32G", pattern=r"^[0-9]+[KMGT]?$")
    """memory per node (--mem), e.g. 64G"""
    time_limit: str = "1:00:00"
    """job time limit (--time): MM, H:MM:SS or D-HH:MM:SS; jobs are renewed before it"""
    time_min: str | None = None
    """--time-min: backfill may start a job sooner with a shorter limit (down to this)"""
    account: str | None = None
    """Slurm account to charge (--account)"""
    qos: str | None = None
    """quality of service (--qos)"""
    reservation: str | None = None
    """advance reservation to run in (--reservation)"""
    constraint: str | None = None
    """node features (--constraint), e.g. a100"""
    extra_sbatch: list[str] = Field(default_factory=list)
    """further sbatch options, each starting with -; the agent's own are refused"""

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: str) -> str:
        seconds = parse_slurm_time(value)
        if seconds is None:
            raise ValueError("a model service needs a finite time limit, not UNLIMITED")
        return value

    @field_validator("time_min")
    @classmethod
    def _time_min(cls, value: str | None) -> str | None:
        if value is not None and not parse_slurm_time(value):
            raise ValueError("time_min must be a finite, positive Slurm time such as 30:00")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        for option in value:
            if not option.startswith("-") or "\n" in option:
                raise ValueError(f"{option!r} is not an sbatch option (it must start with -)")
            if option.split("=", 1)[0] in RESERVED_SBATCH:
                raise ValueError(f"{option.split('=', 1)[0]} is set by the agent itself")
        return value

    @model_validator(mode="after")
    def _min_below_limit(self) -> SlurmResources:
        if self.time_min is not None and self.time_min_seconds > self.time_limit_seconds:
            raise ValueError("time_min must not be longer than time_limit")
        return self

    @property
    def time_limit_seconds(self) -> int:
        seconds = parse_slurm_time(self.time_limit)
        assert seconds is not None  # validated above
        return seconds

    @property
    def time_min_seconds(self) -> int:
        """The shortest limit Slurm may grant a job: time_min, else time_limit."""
        seconds = parse_slurm_time(self.time_min) if self.time_min else None
        return seconds or self.time_limit_seconds


class Placement(Strict):
    """One partition / QOS / reservation a service's jobs may be queued in."""

    name: str | None = None
    """shown in logs and status; default: partition[/qos][@reservation] as submitted"""
    partition: str | None = None
    """--partition of jobs placed here; None: resources.partition"""
    qos: str | None = None
    """--qos of jobs placed here; None: resources.qos"""
    reservation: str | None = None
    """--reservation of jobs placed here; None: resources.reservation"""
    preemptible: bool = False
    """jobs here may be preempted: only instances above min_instances are placed here"""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not PLACEMENT_NAME.match(value):
            raise ValueError("use letters, digits and . _ : / @ + - (at most 64)")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Placement:
        if not (self.partition or self.qos or self.reservation):
            raise ValueError("a placement names a partition, a qos or a reservation")
        return self

    @property
    def slurm_key(self) -> tuple[str, str, str]:
        """What Slurm is asked for, "" where nothing is."""
        return (self.partition or "", self.qos or "", self.reservation or "")


def default_name(partition: str | None, qos: str | None, reservation: str | None) -> str:
    """`partition[/qos][@reservation]`, e.g. `gpu`, `gpu/burst`, `/burst`, `gpu@maint`."""
    name = partition or ""
    name += f"/{qos}" if qos else ""
    return name + (f"@{reservation}" if reservation else "")


def resolve_placements(
    placements: Sequence[Placement], resources: SlurmResources
) -> tuple[Placement, ...]:
    """The candidates with every Slurm field filled from `resources` where unset and a name;
    a service without placements has one, named "", that is its resources as they are."""
    if not placements:
        default = Placement.model_construct(
            name="",
            partition=resources.partition,
            qos=resources.qos,
            reservation=resources.reservation,
            preemptible=False,
        )
        return (default,)
    resolved = []
    for placement in placements:
        partition = placement.partition or resources.partition
        qos = placement.qos or resources.qos
        reservation = placement.reservation or resources.reservation
        name = placement.name or default_name(partition, qos, reservation)
        resolved.append(
            Placement.model_construct(
                name=name,
                partition=partition,
                qos=qos,
                reservation=reservation,
                preemptible=placement.preemptible,
            )
        )
    return tuple(resolved)


def placement_problem(placements: Sequence[Placement], min_instances: int) -> str | None:
    """Why resolved placements cannot be used (one line), or None when they can."""
    names: set[str] = set()
    asks: dict[tuple[str, str, str], str] = {}
    for placement in placements:
        name = placement.name or ""
        if name in names:
            return f"placement name {name!r} is used twice (set distinct names)"
        names.add(name)
        other = asks.setdefault(placement.slurm_key, name)
        if other != name:
            return f"placements {other!r} and {name!r} ask Slurm for the same place"
    if min_instances > 0 and all(placement.preemptible for placement in placements):
        return "min_instances needs a placement that is not preemptible"
    return None
