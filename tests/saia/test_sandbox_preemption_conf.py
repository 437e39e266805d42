"""The sandbox cluster's preemption settings (saia/sandbox/slurm_conf.py): pure text.

The default partition `gpu`, which every other Slurm test uses, must stay the default and
never be preempted; the burst partitions are preempted by `urgent` after a grace time.
What Slurm does with them: tests/faults/test_preemption.py and
tests/hpc/scheduler/test_preemption_slurm.py.
"""

from __future__ import annotations

from pathlib import Path

from saia.sandbox.slurm_conf import BURST, BURST_REQUEUE, GRACE_TIME, URGENT, render_slurm_conf


def conf(tmp_path: Path) -> str:
    return render_slurm_conf(
        root=tmp_path, cluster="c1", host="h", ctld_port=7001, slurmd_port=7002,
        munge_socket=tmp_path / "m.sock", cpus=8, memory_mb=1000,
    )  # fmt: skip


def partitions(text: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in text.splitlines():
        if line.startswith("PartitionName="):
            fields = dict(word.split("=", 1) for word in line.split())
            found[fields.pop("PartitionName")] = fields
    return found


def test_gpu_stays_the_default_and_is_never_preempted(tmp_path: Path) -> None:
    parts = partitions(conf(tmp_path))
    assert [name for name, p in parts.items() if p.get("Default") == "YES"] == ["gpu"]
    assert parts["gpu"]["PreemptMode"] == "OFF"
    assert parts[URGENT]["PreemptMode"] == "OFF"
    assert all(p["Nodes"] == "h" for p in parts.values())  # one node shared by all


def test_burst_partitions_are_preempted_by_urgent_after_a_grace_time(tmp_path: Path) -> None:
    text = conf(tmp_path)
    assert "PreemptType=preempt/partition_prio" in text.splitlines()
    # the job's shell gets its --signal=B:TERM at preemption, not only at the grace end
    assert "SlurmctldParameters=preempt_send_user_signal" in text.splitlines()
    parts = partitions(text)
    assert parts[BURST]["PreemptMode"] == "CANCEL"
    assert parts[BURST_REQUEUE]["PreemptMode"] == "REQUEUE"
    for name in (BURST, BURST_REQUEUE):
        assert parts[name]["GraceTime"] == str(GRACE_TIME)
        assert int(parts[name]["PriorityTier"]) < int(parts[URGENT]["PriorityTier"])
    assert parts[BURST]["PriorityTier"] == parts["gpu"]["PriorityTier"]  # gpu preempts none
