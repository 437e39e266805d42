"""The pure retention decision of `<state_dir>/jobs/` (hpc/scheduler/job_folders.py)."""

from __future__ import annotations

from hpc.scheduler.job_folders import CACHE_GRACE, JobFiles, Removal, plan_removals

DAY = 86400.0
NOW = 100 * DAY
WEEK = 7 * DAY


def names(removals: list[Removal]) -> list[str]:
    return [r.name for r in removals]


def test_a_job_slurm_lists_or_the_agent_tracks_is_never_touched_however_old() -> None:
    old = JobFiles("7", NOW - 60 * DAY, folder=True, log=True, cache=True)
    assert plan_removals([old], kept={"7"}, now=NOW, retention=WEEK) == []


def test_an_ended_job_loses_its_cache_soon_and_folder_and_log_after_the_retention() -> None:
    just_ended = JobFiles("5", NOW - 60, folder=True, log=True, cache=True)
    assert plan_removals([just_ended], set(), NOW, WEEK) == []  # a requeue may list it yet
    ended = JobFiles("5", NOW - CACHE_GRACE, folder=True, log=True, cache=True)
    assert names(plan_removals([ended], set(), NOW, WEEK)) == ["5/vllm-cache"]
    almost = JobFiles("5", NOW - WEEK + 1, folder=True, log=True)
    assert plan_removals([almost], set(), NOW, WEEK) == []  # `saia hpc logs 5` still works
    old = JobFiles("5", NOW - WEEK, folder=True, log=True, cache=True)
    removals = plan_removals([old], set(), NOW, WEEK)
    assert [(r.what, r.name) for r in removals] == [("folder", "5"), ("log", "5.log")]
    assert all(r.last_change == NOW - WEEK for r in removals)  # the remover re-checks it


def test_caches_go_first_then_the_oldest_folders_and_logs_within_the_limit() -> None:
    found = [
        JobFiles("3", NOW - 9 * DAY, folder=True, log=True),
        JobFiles("1", NOW - 30 * DAY, log=True),  # died before its prologue made a folder
        JobFiles("8", NOW - DAY, folder=True, log=True, cache=True),
        JobFiles("9", NOW, folder=True, log=True, cache=True),  # running
    ]
    plan = plan_removals(found, {"9"}, NOW, WEEK)
    assert names(plan) == ["8/vllm-cache", "1.log", "3", "3.log"]
    assert names(plan_removals(found, {"9"}, NOW, WEEK, limit=2)) == ["8/vllm-cache", "1.log"]


def test_a_retention_shorter_than_the_cache_grace_applies_to_the_cache_too() -> None:
    ended = JobFiles("4", NOW - 5, folder=True, cache=True)
    assert names(plan_removals([ended], set(), NOW, retention=5)) == ["4"]
    assert names(plan_removals([ended], set(), NOW, retention=10)) == []
