"""The squeue/sbatch parsers on output recorded from the real sandbox cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc.jobs.squeue import (
    ParseError,
    expand_hostlist,
    first_error_line,
    parse_duration_field,
    parse_sbatch_parsable,
    parse_squeue,
    parse_timestamp,
    tagged_jobs,
)
from hpc.jobs.system import JobTag

DATA = Path(__file__).parents[1] / "data"  # tests/hpc/data
TAG = JobTag(prefix="saia", agent_id="a1")


def _data(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_mixed_queue_keeps_only_tagged_jobs() -> None:
    jobs = {job.job_id: job for job in tagged_jobs(_data("squeue_mixed.txt"), TAG)}
    assert sorted(jobs) == ["1", "2"]
    running, pending = jobs["1"], jobs["2"]
    assert running.service == "big"
    assert running.state == "RUNNING" and running.running and running.active
    assert running.time_limit_s == 2 * 86400
    assert running.time_left_s == 86400 + 23 * 3600 + 59 * 60 + 57
    assert running.start_time == parse_timestamp("2026-11-22T20:07:48")
    assert running.nodes == ("vm",)
    assert running.reason == ""
    assert pending.service == "tiny/model:7b"
    assert pending.state == "PENDING" and not pending.running and pending.active
    assert pending.time_limit_s == pending.time_left_s == 600
    assert pending.start_time is None  # the estimate is not a start
    assert pending.submit_time == parse_timestamp("2026-11-22T20:07:48")
    assert pending.nodes == ()
    assert pending.reason == "Resources"
    # where Slurm queued them: which of a service's placements each job is in
    assert (pending.partition, pending.qos, pending.reservation) == ("gpu", "normal", "")
    assert (running.partition, running.qos, running.reservation) == ("gpu", "burst", "maint")


def test_foreign_comment_with_separator_stays_in_its_field() -> None:
    rows = {row.job_id: row for row in parse_squeue(_data("squeue_mixed.txt"))}
    assert rows["3"].comment == "with | pipe"
    assert rows["3"].time_limit == "365-00:00:00"
    assert rows["4"].time_limit == "UNLIMITED"
    assert rows["5"].start_time == "N/A"
    assert parse_duration_field(rows["4"].time_left) is None
    assert parse_timestamp(rows["5"].start_time) is None


def test_other_agent_and_other_prefix_are_not_ours() -> None:
    text = _data("squeue_mixed.txt")
    assert tagged_jobs(text, JobTag(prefix="saia", agent_id="someone-else")) == []
    assert tagged_jobs(text, JobTag(prefix="other", agent_id="a1")) == []


def test_after_cancel_the_cancelled_job_is_gone() -> None:
    jobs = tagged_jobs(_data("squeue_after_cancel.txt"), TAG)
    assert [(job.job_id, job.state, job.time_left_s) for job in jobs] == [("2", "RUNNING", 599)]


def test_empty_output_is_no_jobs() -> None:
    assert parse_squeue(_data("squeue_empty.txt")) == []
    assert tagged_jobs("\n\n", TAG) == []


def test_short_line_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="expected 13 fields"):
        parse_squeue("1|saia-x|RUNNING\n")


def test_timestamps_are_utc() -> None:
    assert parse_timestamp("1970-01-02T00:00:00") == 86400.0
    assert parse_timestamp("Unknown") is None
    with pytest.raises(ParseError):
        parse_timestamp("yesterday")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5:00", 300), ("1:02:03", 3723), ("3-00:00:00", 259200), ("UNLIMITED", None), ("N/A", None)],
)
def test_duration_fields(text: str, seconds: int | None) -> None:
    assert parse_duration_field(text) == seconds


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("vm", ("vm",)),
        ("node[01-03]", ("node01", "node02", "node03")),
        ("gpu[1,3-4],login1", ("gpu1", "gpu3", "gpu4", "login1")),
        ("n[8-10]", ("n8", "n9", "n10")),
        ("r[1-2]c[1-2]", ("r1c1", "r1c2", "r2c1", "r2c2")),
        ("", ()),
    ],
)
def test_hostlists(text: str, hosts: tuple[str, ...]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node]", "node[3-1]", "node[a-b]"])
def test_bad_hostlists(text: str) -> None:
    with pytest.raises(ParseError):
        expand_hostlist(text)


def test_sbatch_parsable() -> None:
    assert parse_sbatch_parsable(_data("sbatch_parsable.txt")) == "1"
    assert parse_sbatch_parsable("1234;cluster2\n") == "1234"
    with pytest.raises(ParseError):
        parse_sbatch_parsable("")
    with pytest.raises(ParseError):
        parse_sbatch_parsable("Submitted batch job 12\n")


def test_first_error_line_of_recorded_errors() -> None:
    assert first_error_line(_data("sbatch_bad_partition.stderr")) == (
        "invalid partition specified: nosuch"
    )
    assert first_error_line(_data("sbatch_unavailable.stderr")) == (
        "Batch job submission failed: Requested node configuration is not available"
    )
    assert first_error_line("") == "no error message"
