"""Start waits recorded on a real cluster, as the simulator's queue model.

A sample file has one job per line, `partition|qos|submit|start` (Slurm's `--parsable2`
separator; times as Slurm prints them, `YYYY-MM-DDTHH:MM:SS`), for example from

    sacct -X -n -P -a -S now-7days -o Partition,QOS,Submit,Start
    squeue --start -h -o '%P|%q|%V|%S'

(the first: jobs that started, their real waits; the second: pending jobs and Slurm's
expected starts). Lines with an unknown start (`Unknown`, `None`) are skipped, as are blank
lines and `#` comments. Each job's wait (start - submit) goes to its `partition/qos` and
its `partition`; the simulator then draws a job's wait from the recorded ones of its queue.
"""

from __future__ import annotations

from pathlib import Path

from hpc.jobs.squeue import ParseError, parse_timestamp
from saia.base.config_file import ConfigError

FORMAT = "partition|qos|submit|start"


def parse_waits(text: str, source: Path | str) -> dict[str, list[float]]:
    """Recorded waits per `partition/qos` and per `partition`; ConfigError names the first
    bad line."""
    waits: dict[str, list[float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split("|")]
        try:
            if len(fields) != 4 or not fields[0]:
                raise ParseError("fields")
            partition, qos, submit_text, start_text = fields
            submit, start = parse_timestamp(submit_text), parse_timestamp(start_text)
        except ParseError:
            raise ConfigError(f"{source}: line {number}: expected {FORMAT}") from None
        if submit is None or start is None:
            continue  # not started, no estimate
        for key in {partition, f"{partition}/{qos}" if qos else partition}:
            waits.setdefault(key, []).append(max(0.0, start - submit))
    if not waits:
        raise ConfigError(f"{source}: no job with a known submit and start time")
    return waits


def read_waits(path: Path) -> dict[str, list[float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    return parse_waits(text, path)
