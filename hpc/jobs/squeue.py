"""Pure parsers of the Slurm command-line tools' output (squeue, sbatch, host lists).

`slurm_cli` runs squeue with `SQUEUE_FORMAT` under `TZ=UTC` and `SLURM_TIME_FORMAT=standard`,
so every time stamp here is ISO-8601 in UTC. The comment is the last field because a
foreign job's comment may contain the separator.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

from hpc.jobs.system import JobInfo, JobTag, StartEstimate
from saia.base.durations import parse_slurm_time

SEPARATOR = "|"
# job id, name, state, time limit, time left, start, submit, node list, reason, partition,
# QOS, reservation, comment
SQUEUE_FIELDS = ("%i", "%j", "%T", "%l", "%L", "%S", "%V", "%N", "%r", "%P", "%q", "%v", "%k")
SQUEUE_FORMAT = SEPARATOR.join(SQUEUE_FIELDS)
_NO_VALUE = {"", "N/A", "NONE", "(NULL)", "UNKNOWN", "INVALID"}  # compared upper-case
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class ParseError(ValueError):
    """Output of a Slurm tool that does not have the expected shape."""


@dataclass(frozen=True)
class SqueueRow:
    """One line of squeue output, fields still as Slurm printed them (but split)."""

    job_id: str
    name: str
    state: str
    time_limit: str
    time_left: str
    start_time: str
    submit_time: str
    nodelist: str
    reason: str
    partition: str
    qos: str
    reservation: str
    comment: str


def parse_squeue(text: str) -> list[SqueueRow]:
    """Rows of `squeue --noheader --format=SQUEUE_FORMAT` output; blank lines are skipped."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(SEPARATOR, len(SQUEUE_FIELDS) - 1)
        if len(fields) != len(SQUEUE_FIELDS):
            raise ParseError(
                f"squeue line {number}: expected {len(SQUEUE_FIELDS)} fields: {line!r}"
            )
        rows.append(SqueueRow(*(field.strip() for field in fields)))
    return rows


def parse_timestamp(text: str) -> float | None:
    """Epoch seconds of a UTC `YYYY-MM-DDTHH:MM:SS`; None for N/A, Unknown and the like."""
    value = text.strip()
    if value.upper() in _NO_VALUE:
        return None
    try:
        parsed = time.strptime(value, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise ParseError(f"invalid Slurm time stamp {text!r}") from None
    return float(calendar.timegm(parsed))


def parse_duration_field(text: str) -> int | None:
    """Seconds of a time limit / time left; None for UNLIMITED and for missing values."""
    if text.strip().upper() in _NO_VALUE:
        return None
    try:
        return parse_slurm_time(text)
    except ValueError:
        raise ParseError(f"invalid Slurm duration {text!r}") from None


def expand_hostlist(text: str) -> tuple[str, ...]:
    """Host names of a Slurm host list such as `gpu[01-03,07],login1`."""
    hosts: list[str] = []
    for part in _split_top_level(text.strip()):
        hosts.extend(_expand_one(part))
    return tuple(hosts)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ParseError(f"invalid host list {text!r}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ParseError(f"invalid host list {text!r}")
    parts.append(current)
    return [part for part in parts if part]


def _expand_one(pattern: str) -> list[str]:
    """`node[01-02]x[1-2]` -> node01x1, node01x2, node02x1, node02x2 (Slurm's order)."""
    if "[" not in pattern:
        return [pattern]
    head, _, rest = pattern.partition("[")
    body, _, tail = rest.partition("]")
    out: list[str] = []
    for item in body.split(","):
        match = _RANGE.match(item)
        if not match:
            raise ParseError(f"invalid host range {item!r} in {pattern!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ParseError(f"invalid host range {item!r} in {pattern!r}")
        for number in range(int(first), int(last) + 1):
            out.extend(head + str(number).zfill(len(first)) + t for t in _expand_one(tail))
    return out


def service_of(row: SqueueRow, tag: JobTag) -> str | None:
    """The service a row belongs to when the job is this agent's (name AND comment), else None."""
    prefix = f"{tag.prefix}-"
    if row.comment != tag.comment or not row.name.startswith(prefix):
        return None
    service = row.name[len(prefix) :]
    return service or None


def job_info(row: SqueueRow, service: str) -> JobInfo:
    """A JobInfo from a row; a pending job's (estimated) start time is not reported."""
    start = None if row.state == "PENDING" else parse_timestamp(row.start_time)
    nodes = expand_hostlist(row.nodelist) if row.nodelist.upper() not in _NO_VALUE else ()
    return JobInfo(
        job_id=row.job_id,
        service=service,
        state=row.state.split()[0].rstrip("+"),
        time_limit_s=parse_duration_field(row.time_limit),
        time_left_s=parse_duration_field(row.time_left),
        start_time=start,
        submit_time=parse_timestamp(row.submit_time),
        nodes=nodes,
        reason=_value(row.reason),
        partition=_value(row.partition),
        qos=_value(row.qos),
        reservation=_value(row.reservation),
    )


def _value(text: str) -> str:
    """The field, or "" when Slurm prints one of its placeholders for nothing."""
    return "" if text.upper() in _NO_VALUE else text


def tagged_jobs(text: str, tag: JobTag) -> list[JobInfo]:
    """This agent's jobs in squeue output; everyone else's rows are dropped unparsed."""
    jobs = []
    for row in parse_squeue(text):
        service = service_of(row, tag)
        if service is not None:
            jobs.append(job_info(row, service))
    return jobs


def parse_sbatch_parsable(text: str) -> str:
    """The job id of `sbatch --parsable` output (`jobid` or `jobid;cluster`)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError("sbatch printed no job id")
    job_id = lines[-1].split(";", 1)[0]
    if not job_id.isdigit():
        raise ParseError(f"sbatch printed {lines[-1]!r}, not a job id")
    return job_id


def first_error_line(stderr: str) -> str:
    """The first line of a Slurm tool's error output, without the `tool: error: ` prefix."""
    for line in stderr.splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^[a-z]+: error: ", "", line)
    return "no error message"


# `squeue --start`: each pending job's expected start time as the scheduler last computed
# it (N/A until the backfill scheduler has looked at the job).
START_FORMAT = SEPARATOR.join(("%i", "%S"))
# `sbatch --test-only` (stderr): "sbatch: Job 12 to start at 2024-05-01T10:00:00 using 2
# processors on nodes gpu01 in partition gpu"
_TEST_ONLY = re.compile(
    r"Job (\d+) to start at (\S+) using (\d+) processors on nodes (\S+) in partition (\S+)"
)


def parse_start_estimates(text: str) -> dict[str, float | None]:
    """Job id -> expected start (epoch s, None when Slurm gives none) of `squeue --start
    --noheader --format=START_FORMAT` output."""
    estimates: dict[str, float | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        job_id, sep, start = line.partition(SEPARATOR)
        if not sep or not job_id.strip().isdigit():
            raise ParseError(f"squeue --start line {number}: expected JOBID|START: {line!r}")
        estimates[job_id.strip()] = parse_timestamp(start)
    return estimates


def parse_test_only(stderr: str) -> StartEstimate:
    """The estimate in `sbatch --test-only`'s message; ParseError if it has none."""
    match = _TEST_ONLY.search(stderr)
    if match is None:
        raise ParseError(
            f"sbatch --test-only printed no start estimate: {first_error_line(stderr)}"
        )
    start = parse_timestamp(match.group(2))
    if start is None:
        raise ParseError(f"sbatch --test-only gave no start time: {match.group(2)!r}")
    return StartEstimate(start, expand_hostlist(match.group(4)), match.group(5))
