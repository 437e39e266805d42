"""The hub's `batches` section: the Files and Batches API (/v1/files, /v1/batches)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from saia.base.config_file import Duration, Strict

__all__ = ["BatchesConfig"]


class BatchesConfig(Strict):
    """Batch inference: uploaded JSONL files run as Slurm jobs on the agent's cluster."""

    enabled: bool = True
    """serve /v1/files and /v1/batches (only models of `hpc` upstreams can run batches)"""
    files_dir: Path | None = None
    """where uploaded and result files are kept; None: `<data_dir>/files`"""
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    """largest uploaded file (OpenAI: 200 MB)"""
    max_line_bytes: int = Field(1024 * 1024, ge=256)
    """largest single request line of a batch input file"""
    max_requests: int = Field(50_000, ge=1, description="request lines per batch input file")
    completion_windows: dict[str, Duration] = Field(default_factory=lambda: {"24h": 86400.0})
    """completion_window values clients may use and their length (the job's --deadline)"""
    poll_interval: Duration = Field(30.0, gt=0)
    """how often the hub asks the agents about running batches"""
    price_factor: float = Field(1.0, ge=0)
    """cost of a batch token relative to an interactive one, kept with each batch for billing"""
    transfer_chunk_bytes: int = Field(1024 * 1024, ge=4096)
    """input files go to the agent in pieces of this size (one hop request each)"""
    lease_time: Duration = Field(
        60.0,
        gt=0,
        description="how long a replica holds a batch whose input it sends or output it copies"
        " (renewed every third of it; another replica takes over once it expired)",
    )
    file_lifetime: Duration | None = Field(
        30 * 86400.0,
        gt=0,
        description="files without the client's `expires_after` are removed this long after"
        " their creation; null: kept until deleted",
    )
