"""The throw-away Slurm cluster really schedules GPU jobs (marker slurm)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from saia.sandbox.slurm import SlurmSandbox, render_gres_conf, render_slurm_conf

pytestmark = pytest.mark.slurm


def _wait_gone(cluster: SlurmSandbox, job_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = cluster.run(["squeue", "--noheader", "--jobs", job_id, "--format=%i"])
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still queued after {timeout}s")


def test_gres_job_sees_its_gpu(slurm_cluster: SlurmSandbox, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    submitted = slurm_cluster.run(
        [
            "sbatch",
            "--parsable",
            "--gres=gpu:2",
            f"--output={out}",
            "--wrap",
            "echo CUDA=$CUDA_VISIBLE_DEVICES",
        ]
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    _wait_gone(slurm_cluster, job_id)
    assert out.read_text().strip() == "CUDA=0,1"


def test_node_is_idle_with_four_gpus(slurm_cluster: SlurmSandbox) -> None:
    shown = slurm_cluster.run(["scontrol", "show", "node", "-o", slurm_cluster.host])
    assert shown.returncode == 0, shown.stderr
    assert "Gres=gpu:4" in shown.stdout
    assert all(os.path.exists(p) for p in [slurm_cluster.slurm_conf, slurm_cluster.munge_socket])


def test_two_sandboxes_run_side_by_side(slurm_cluster: SlurmSandbox) -> None:
    with SlurmSandbox() as second:
        assert second.root != slurm_cluster.root
        assert second.cluster != slurm_cluster.cluster
        submitted = second.run(["sbatch", "--parsable", "--wrap", "true"])
        assert submitted.returncode == 0, submitted.stderr
        pids = second.pids
    assert not second.root.exists()
    assert all(not _alive(pid) for pid in pids)
    ping = slurm_cluster.run(["scontrol", "ping"])
    assert "UP" in ping.stdout


def test_given_root_survives_a_restart(tmp_path: Path) -> None:
    job_ids = []
    for _ in range(2):
        with SlurmSandbox(tmp_path / "cluster", cpus=1) as sandbox:
            submitted = sandbox.run(
                ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "true"]
            )
            assert submitted.returncode == 0, submitted.stderr
            job_ids.append(int(submitted.stdout.strip()))
    assert job_ids[1] > job_ids[0]  # the saved state was taken up again
    assert (tmp_path / "cluster" / "etc" / "slurm.conf").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rendered_config_is_private_to_its_root(tmp_path: Path) -> None:
    conf = render_slurm_conf(
        root=tmp_path,
        cluster="c1",
        host="h",
        ctld_port=7001,
        slurmd_port=7002,
        munge_socket=tmp_path / "m.sock",
        cpus=2,
        memory_mb=1000,
    )
    assert f"AuthInfo=socket={tmp_path}/m.sock" in conf
    assert "SlurmctldHost=h(127.0.0.1)" in conf
    assert "NodeName=h NodeAddr=127.0.0.1 NodeHostname=h CPUs=2 RealMemory=1000 Gres=gpu:4" in conf
    values = [line.split("=", 1)[1] for line in conf.splitlines()]
    paths = [value for value in values if value.startswith("/")]
    assert paths and all(p.startswith(str(tmp_path)) or p == "/bin/true" for p in paths)
    gres = render_gres_conf("h", tmp_path)
    assert gres.splitlines() == [
        "AutoDetect=off",
        f"NodeName=h Name=gpu File={tmp_path}/fakegpu[0-3]",
    ]


def test_missing_binary_names_the_installer(monkeypatch: pytest.MonkeyPatch) -> None:
    import saia.sandbox.slurm as sandbox_module

    monkeypatch.setattr(sandbox_module, "SBIN", Path("/nonexistent"))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sandbox_module.SandboxError, match=r"saia\.sandbox\.packages"):
        SlurmSandbox().start()
