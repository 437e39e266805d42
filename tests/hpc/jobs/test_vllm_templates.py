"""The vLLM job templates: the documented examples, and the scripts run by bash for real.

There is no Apptainer, Ray or second node here, so those runs put small stand-in programs
for `apptainer`, `srun`, `scontrol`, `ray` and `vllm` first on PATH; they record their argv
and environment and act like the real ones where the script depends on it (apptainer runs
the command after the image, srun runs its command, ray blocks until SIGTERM). Everything
else (the prologue, traps, key file, endpoint, waits) is the real rendered script.

`python -m tests.hpc.jobs.test_vllm_templates` rewrites docs/examples/*.sh after a deliberate
template change.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import hpc
from hpc.config import AgentConfig, load_config, parse_config
from hpc.jobs.script import render_job, template_file
from hpc.jobs.system import JobTag

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"
EXAMPLE_TAG = JobTag(prefix="saia", agent_id="login1")
WAIT = 20.0


def render_example(config_path: Path) -> str:
    config = load_config(config_path)
    return render_job(config.services[0], config, EXAMPLE_TAG).script


def example_configs() -> list[Path]:
    return sorted(EXAMPLES.glob("vllm-*.yaml"))


@pytest.mark.parametrize("config_path", example_configs(), ids=lambda p: p.stem)
def test_documented_example_is_what_the_renderer_makes(config_path: Path) -> None:
    script = config_path.with_suffix(".sh").read_text(encoding="utf-8")
    assert script == render_example(config_path), (
        f"{config_path.with_suffix('.sh')} is stale: "
        "run `python -m tests.hpc.jobs.test_vllm_templates`"
    )
    checked = subprocess.run(["bash", "-n"], input=script, text=True, timeout=10, check=False)
    assert checked.returncode == 0


def test_examples_cover_every_vllm_feature() -> None:
    scripts = {p.stem: p.with_suffix(".sh").read_text() for p in example_configs()}
    assert "--enable-auto-tool-choice" in scripts["vllm-single-node"]
    assert "SAIA_CONTAINER=/images/vllm-0.32.0.sif" in scripts["vllm-apptainer"]
    assert '"$SAIA_RAY" start --head' in scripts["vllm-multinode"]
    assert 'srun --nodes=1 --ntasks=1 -w "$node" --cpus-per-task=' in scripts["vllm-multinode"]
    assert "--runner pooling" in scripts["vllm-embeddings"]
    for script in scripts.values():
        assert "#SBATCH --no-requeue" in script
        assert "#SBATCH --signal=B:TERM@60" in script
        assert "#SBATCH --output=/srv/saia/state/jobs/%j.log" in script


def test_job_script_command_prints_the_rendered_script() -> None:
    config_path = EXAMPLES / "vllm-single-node.yaml"
    result = CliRunner().invoke(hpc, ["job-script", "-c", str(config_path), "llama-3.1-8b"])
    assert result.exit_code == 0, result.output
    expected = render_example(config_path).replace("saia-agent:login1", "saia-agent:AGENT-ID")
    assert result.output == expected
    missing = CliRunner().invoke(hpc, ["job-script", "-c", str(config_path), "nope"])
    assert missing.exit_code == 2
    assert "no service 'nope'" in missing.output


def test_vllm_on_several_nodes_uses_the_multinode_body() -> None:
    config = load_config(EXAMPLES / "vllm-multinode.yaml")
    assert template_file(config.services[0]) == "vllm-multinode.sh"
    single = load_config(EXAMPLES / "vllm-single-node.yaml")
    assert template_file(single.services[0]) == "vllm.sh"


def test_apptainer_binds_state_model_hf_home_and_chat_template() -> None:
    script = render_example(EXAMPLES / "vllm-apptainer.yaml")
    binds = next(line for line in script.splitlines() if line.startswith("SAIA_CONTAINER_BINDS="))
    assert binds == (
        "SAIA_CONTAINER_BINDS=(/scratch/vllm-cache /srv/saia/state /scratch/hf "
        "/models/Qwen2.5-32B-Instruct-AWQ /models/templates/qwen.jinja)"
    )


# -- the rendered scripts run by bash, with stand-ins for what this machine lacks ---------
RECORD = """#!/bin/bash
# Append "<name> <argv as JSON>" and selected env vars to $FAKE_LOG.
"{python}" - "$(basename "$0")" "$@" >>"$FAKE_LOG" <<'PY'
import json, os, sys
env = {{k: os.environ.get(k) for k in (
    "VLLM_API_KEY", "HF_HUB_OFFLINE", "HF_HOME", "VLLM_CACHE_ROOT", "RAY_ADDRESS",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}}
print(json.dumps({{"cmd": sys.argv[1], "argv": sys.argv[2:], "env": env}}))
PY
"""
# The trap comes first: a stop right after the record must still end the fake cleanly.
BLOCKING_RECORD = RECORD.replace("#!/bin/bash\n", "#!/bin/bash\ntrap 'exit 0' TERM INT\n", 1)
BLOCK = "while :; do sleep 0.1; done\n"
# `vllm serve ... --host H --port P`: listen there (the job publishes its endpoint only
# once its server holds the port) until SIGTERM.
LISTEN = """exec "{python}" -c '
import signal, socket, sys
argv = sys.argv[1:]
address = (argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1]))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = socket.create_server(address)
signal.pause()
' "$@"
"""
# `ray --version` (not recorded): the Ray in FAKE_RAY_VERSION, token authentication's.
RAY_VERSION = """if [[ "$1" == --version ]]; then
    echo "ray, version ${FAKE_RAY_VERSION:-2.52.0}"
    exit 0
fi
"""
FAKES = {
    # apptainer exec [--nv] [--bind X]... IMAGE CMD...: run CMD
    "apptainer": RECORD
    + """shift
while [[ "$1" == --* ]]; do
    if [[ "$1" == --bind ]]; then shift; fi
    shift
done
shift
exec "$@"
""",
    "scontrol": RECORD + 'printf "%s\\n" node1 node2 node3\n',
    # srun [--opt=x | -w NODE]... CMD...: run CMD
    "srun": RECORD
    + """while [[ "$1" == -* ]]; do
    if [[ "$1" == -w ]]; then shift; fi
    shift
done
exec "$@"
""",
    # `ray start ... --block`: count the node as joined, block until SIGTERM
    "ray": "#!/bin/bash\n"
    + RAY_VERSION
    + BLOCKING_RECORD.removeprefix("#!/bin/bash\n")
    + 'echo joined >>"$FAKE_RAY_NODES"\n'
    + BLOCK,
    # `python3 -c ...` (saia_ray_nodes): how many nodes joined
    "python3": 'wc -l <"$FAKE_RAY_NODES" 2>/dev/null || echo 0\n',
    "vllm": BLOCKING_RECORD + LISTEN,
}


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        path = bin_dir / name
        head = "" if text.startswith("#!") else "#!/bin/bash\n"
        path.write_text(
            head + text.replace("{python}", sys.executable).replace("{{", "{").replace("}}", "}")
        )
        path.chmod(0o755)
    return bin_dir


def run_config(tmp_path: Path, **service: object) -> AgentConfig:
    return parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "python": sys.executable,
            "backend_bind_host": "127.0.0.1",
            "backend_advertise_host": "127.0.0.1",
            "services": [{"name": "svc", "model": "/models/m", **service}],
        }
    )


@dataclass(frozen=True)
class Call:
    """One recorded run of a stand-in command."""

    argv: list[str]
    env: dict[str, str | None]


class RunningJob:
    """The rendered script run by bash as Slurm would, in its own process group."""

    def __init__(self, config: AgentConfig, fake_bin: Path, tmp_path: Path) -> None:
        self.log = tmp_path / "fake.log"
        self.job_dir = config.state_dir / "jobs" / "77"
        self.script = render_job(config.services[0], config, EXAMPLE_TAG).script
        env = {
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "node[1-3]",
            "SLURM_CPUS_PER_TASK": "6",
            "FAKE_LOG": str(self.log),
            "FAKE_RAY_NODES": str(tmp_path / "ray-nodes"),
        }
        self.output = (tmp_path / "job.out").open("w")
        self.process = subprocess.Popen(
            ["bash", "-c", self.script],
            env=env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def calls(self, command: str) -> list[Call]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [Call(r["argv"], r["env"]) for r in records if r["cmd"] == command]

    def wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + WAIT
        while not path.exists():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, f"no {path.name}: {self.text()}"
            time.sleep(0.05)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT)

    def text(self) -> str:
        self.output.flush()
        return Path(self.output.name).read_text()

    def close(self) -> None:
        """Stop the job if a test did not, and check that it left no process behind."""
        self.output.close()
        if self.process.poll() is None:  # the test failed before stopping it: clean up only
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=WAIT)
            return
        deadline = time.monotonic() + 5
        while group_alive(self.process.pid):
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                pytest.fail("the job left processes behind")
            time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def job_runner(fake_bin: Path, tmp_path: Path) -> Iterator[list[RunningJob]]:
    jobs: list[RunningJob] = []
    yield jobs
    for job in jobs:
        job.close()


def test_apptainer_job_runs_vllm_in_the_image_with_key_and_offline_env(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    config = run_config(
        tmp_path,
        container="/images/vllm.sif",
        hf_home="/scratch/hf",
        vllm={"max_model_len": 1024},
    )
    job = RunningJob(config, fake_bin, tmp_path)
    job_runner.append(job)
    job.wait_for(job.job_dir / "endpoint.json")
    key_file = job.job_dir / "api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    assert len(key) == 64 and int(key, 16) >= 0
    deadline = time.monotonic() + WAIT
    while not job.calls("vllm") and time.monotonic() < deadline:
        time.sleep(0.05)
    [apptainer] = job.calls("apptainer")
    binds = [str(config.state_dir), "/scratch/hf", "/models/m"]
    expected = ["exec", "--nv"] + [x for b in binds for x in ("--bind", b)]
    assert apptainer.argv[:8] == expected
    assert apptainer.argv[8:11] == ["/images/vllm.sif", "vllm", "serve"]
    [vllm] = job.calls("vllm")
    assert vllm.argv[:5] == ["serve", "/models/m", "--host", "127.0.0.1", "--port"]
    assert vllm.argv[5].isdigit()
    assert "--max-model-len" in vllm.argv
    assert vllm.env == {
        "VLLM_API_KEY": key,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": "/scratch/hf",
        "VLLM_CACHE_ROOT": str(job.job_dir / "vllm-cache"),
        "RAY_ADDRESS": None,
        "RAY_AUTH_MODE": None,
        "RAY_AUTH_TOKEN_PATH": None,
    }
    assert not any(key in arg for arg in vllm.argv)
    assert job.stop() == 0


def test_multinode_job_forms_ray_then_serves_on_the_head(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    config = run_config(
        tmp_path,
        resources={"nodes": 3, "gpus": 2},
        vllm={"ray_port": 6390},
        api_key=False,
    )
    job = RunningJob(config, fake_bin, tmp_path)
    job_runner.append(job)
    job.wait_for(job.job_dir / "endpoint.json")
    endpoint = json.loads((job.job_dir / "endpoint.json").read_text())
    assert endpoint["host"] == "127.0.0.1" and endpoint["job_id"] == "77"
    srun = sorted(c.argv for c in job.calls("srun"))
    assert srun == [
        [
            "--nodes=1",
            "--ntasks=1",
            "-w",
            node,
            "--cpus-per-task=6",
            "--kill-on-bad-exit=1",
            "ray",
            "start",
            "--block",
            "--disable-usage-stats",
            f"--address={address(job)}",
            "--num-gpus=2",
        ]
        for node in ("node2", "node3")
    ]
    ray = [c.argv for c in job.calls("ray")]
    assert sum(1 for argv in ray if "--head" in argv) == 1
    assert len(ray) == 3
    deadline = time.monotonic() + WAIT
    while not job.calls("vllm") and time.monotonic() < deadline:
        time.sleep(0.05)
    [vllm] = job.calls("vllm")
    argv = vllm.argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "3"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert vllm.env["RAY_ADDRESS"] == address(job)
    assert vllm.env["VLLM_API_KEY"] is None
    assert not (job.job_dir / "api_key").exists()
    assert "Ray cluster of 3 nodes; head node1" in job.text()
    assert job.stop() == 0


def address(job: RunningJob) -> str:
    [head] = [c for c in job.calls("ray") if "--head" in c.argv]
    ip = next(a for a in head.argv if a.startswith("--node-ip-address="))
    return ip.split("=", 1)[1] + ":6390"


def test_multinode_job_fails_clearly_when_a_worker_dies(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    (fake_bin / "srun").write_text("#!/bin/bash\nexit 3\n")  # the worker step fails at once
    config = run_config(tmp_path, resources={"nodes": 2, "gpus": 1})
    job = RunningJob(config, fake_bin, tmp_path)
    job_runner.append(job)
    assert job.process.wait(timeout=WAIT) == 1
    assert "exited before the cluster formed" in job.text()
    assert not (job.job_dir / "endpoint.json").exists()
    assert job.calls("vllm") == []


def main() -> None:
    for config_path in example_configs():
        config_path.with_suffix(".sh").write_text(render_example(config_path), encoding="utf-8")
        print(config_path.with_suffix(".sh"))


if __name__ == "__main__":
    main()
