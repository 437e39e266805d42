"""docs/deployment.md and docs/operations.md, run as written (issue 18).

One machine plays both: the login node (a fresh non-root functional account, the sandbox
Slurm cluster started by the guide's own `saia sandbox slurm up`, and a second sshd that
reads the account's `~/.ssh/authorized_keys`) and the web host (root, the hub's system
user, Debian's nginx with a self-signed certificate). The test builds the saia wheel the
guide installs, and changes only the site's names (`SUBSTITUTIONS`). It ends with a chat
completion through nginx, TLS, the hub, SSH, the relay, the relay-started agent and a
Slurm job, then runs operations.md's commands against that installation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from hpc.config import parse_config
from saia.sandbox.process import free_port
from saia.sandbox.process_tree import descendants, stop_pids
from saia.sandbox.slurm import unavailable
from tests.docs.guide import Step, steps

pytestmark = [pytest.mark.slurm, pytest.mark.ssh, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
GUIDES = [REPO / "docs" / "deployment.md", REPO / "docs" / "operations.md"]
STEP_TIMEOUT = 600.0
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Site:
    """Where the guide's names point on this machine."""

    base: Path
    account: str = field(default_factory=lambda: "sd" + secrets.token_hex(3))
    hub_user: str = field(default_factory=lambda: "sh" + secrets.token_hex(3))
    sshd_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    nginx_port: int = field(default_factory=free_port)
    wheel: Path = Path()
    job_id: str = "4711"
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.base / "home" / self.account

    @property
    def cert(self) -> Path:
        return self.base / "etc/letsencrypt/live/llm.example.org/fullchain.pem"

    @property
    def root_dir(self) -> Path:
        return self.base / "root"

    def substitute(self, text: str) -> str:
        """The guide's text with this site's names (and nothing else changed)."""
        base, port = self.base, self.nginx_port
        pairs = [
            ("/path/to/saia-0.1.0-py3-none-any.whl", str(self.wheel)),
            ("~saia/", f"~{self.account}/"),
            ("/var/tmp/saia-sandbox-slurm", f"{base}/slurm"),
            ("/etc/letsencrypt/", f"{base}/etc/letsencrypt/"),
            ("/etc/saia", f"{base}/etc/saia"),
            ("/etc/nginx", f"{base}/etc/nginx"),
            ("/opt/saia", f"{base}/opt/saia"),
            ("/var/lib/saia", f"{base}/var/lib/saia"),
            ("login1.hpc.example.org", "127.0.0.1"),
            ("-p 22 ", f"-p {self.sshd_port} "),
            ("port: 22 ", f"port: {self.sshd_port} "),
            ("127.0.0.1:8000", f"127.0.0.1:{self.hub_port}"),
            ("port: 8000", f"port: {self.hub_port}"),
            ("listen 443 ssl", f"listen 127.0.0.1:{port} ssl"),
            ("https://llm.example.org/", f"https://llm.example.org:{port}/"),
            ("curl ", f"curl --cacert {self.cert} --resolve llm.example.org:{port}:127.0.0.1 "),
            ("203.0.113.10/32", "127.0.0.1/32"),
            ("user: saia\n", f"user: {self.account}\n"),
            ("4711", self.job_id),
        ]
        for old, new in pairs:
            text = text.replace(old, new)
        return re.sub(r"\bsaia-hub\b(?!\.service)", self.hub_user, text)


def run(argv: list[str], **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, **options)  # type: ignore[call-overload,no-any-return]


def checked(argv: list[str], **options: object) -> str:
    done = run(argv, **options)
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- the machine the guide assumes ----------------------------------------------------


def build_wheel(site: Site) -> None:
    """The wheel of this tree, built from a copy (the guide installs a wheel)."""
    source = site.base / "src"
    files = checked(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO
    ).split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = site.base / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    checked([*pip, "-w", str(wheels), str(source)])
    (site.wheel,) = wheels.glob("saia-*.whl")
    site.wheel = site.wheel.rename(site.base / "wheels" / "saia-0.1.0-py3-none-any.whl")


def make_certificate(site: Site) -> None:
    folder = site.cert.parent
    folder.mkdir(parents=True)
    checked(
        ["openssl", "req", "-x509", "-nodes", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2",
         "-subj", "/CN=llm.example.org", "-addext", "subjectAltName=DNS:llm.example.org",
         "-keyout", str(folder / "privkey.pem"), "-out", str(site.cert)]
    )  # fmt: skip


def start_sshd(site: Site) -> subprocess.Popen[bytes]:
    """The login node's second sshd: the account's own authorized_keys, StrictModes on."""
    folder = site.base / "sshd"
    folder.mkdir()
    key = folder / "host_ed25519"
    checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    config = folder / "sshd_config"
    config.write_text(
        f"Port {site.sshd_port}\nListenAddress 127.0.0.1\nHostKey {key}\n"
        f"PidFile {folder / 'sshd.pid'}\nAllowUsers {site.account}\nUsePAM no\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nLogLevel VERBOSE\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    argv = ["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(folder / "sshd.log")]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def start_nginx(site: Site) -> subprocess.Popen[bytes]:
    """Debian's nginx with the guide's site file as its only server."""
    prefix = site.base / "nginx"
    prefix.mkdir()
    temp = "".join(
        f"{name}_temp_path {prefix / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"user root;\nworker_processes 1;\ndaemon off;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'};\nevents {{}}\n"
        f"http {{\naccess_log {prefix / 'access.log'};\n{temp}"
        f"include {site.base / 'etc/nginx/sites-available/saia'};\n}}\n"
    )
    conf = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    checked([*conf, "-t"])
    process = subprocess.Popen(conf, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", site.nginx_port)):
            return process
        time.sleep(0.1)
    raise AssertionError(f"nginx did not listen: {(prefix / 'error.log').read_text()}")


def wait_http(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- running the guide's steps --------------------------------------------------------


def as_account(site: Site, script: str) -> subprocess.CompletedProcess[str]:
    """bash as the functional account: a login shell with its own environment and
    profile, in its home (what an operator gets after `su - saia`)."""
    return run(["runuser", "-l", site.account, "-c", "set -euo pipefail\n" + script])


def as_root(site: Site, script: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    argv = ["bash", "-euo", "pipefail", "-c", script]
    return run(argv, cwd=site.root_dir, env=env)


def do_step(site: Site, step: Step) -> str:
    text = site.substitute(step.text)
    if step.kind == "check":
        parse_config(yaml.safe_load(text))  # a real cluster's file: its shape only
        return ""
    if step.kind == "copy":
        source = Path(site.substitute(step.attrs["from"]))
        dest = Path(step.attrs["to"].replace("~", str(site.home), 1))
        shutil.copyfile(source, dest)
        shutil.chown(dest, site.account, site.account)
        return ""
    if step.kind == "file":
        return write_file(site, step, text)
    if "background" in step.flags:
        log = (site.base / f"background-{len(site.background)}.log").open("wb")
        env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        argv = ["bash", "-c", "exec " + text]
        site.background.append(
            subprocess.Popen(argv, cwd=site.root_dir, env=env, stdout=log, stderr=log)
        )
        wait_http(f"http://127.0.0.1:{site.hub_port}/health")
        return ""
    done = as_account(site, text) if step.attrs["as"] == "saia" else as_root(site, text)
    assert done.returncode == 0, (
        f"{step.where} failed ({done.returncode}):\n{text}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def write_file(site: Site, step: Step, text: str) -> str:
    raw = step.attrs["path"]
    path = Path(
        raw.replace("~", str(site.home), 1) if raw.startswith("~") else site.substitute(raw)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    if step.attrs["as"] == "saia":
        shutil.chown(path, site.account, site.account)
    return ""


def stop_all(site: Site, processes: list[subprocess.Popen[bytes]]) -> None:
    """Everything the test and the guide started, by pid: servers, the agent, the
    sandbox cluster (through the guide's own `down`), then the two users."""
    for process in [*processes, *site.background]:
        pids = descendants(process.pid)
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        stop_pids([pid for pid in pids if pid != process.pid], 10)
    agent_pid = site.home / "saia" / "state" / "agent.pid"
    if agent_pid.exists():
        stop_pids([int(agent_pid.read_text().split()[0])], 30)
    saia = site.home / "saia" / "venv" / "bin" / "saia"
    if saia.exists():
        run([str(saia), "sandbox", "slurm", "down", "--root", str(site.base / "slurm")])
    for user in (site.account, site.hub_user):
        run(["userdel", user])


@pytest.fixture
def site() -> Iterator[Site]:
    if (reason := unavailable()) is not None:
        pytest.fail(reason)
    for tool in ("nginx", "openssl", "runuser", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: python -m saia.sandbox.packages --for test")
    base = Path(tempfile.mkdtemp(prefix="saia-doctest-", dir="/tmp"))
    base.chmod(0o755)
    site = Site(base)
    try:
        yield site
    finally:
        if not os.environ.get("SAIA_DOCTEST_KEEP"):  # set it to look at the logs
            shutil.rmtree(base, ignore_errors=True)


def test_the_guides_run_as_written(site: Site) -> None:
    started = time.monotonic()
    guide = [step for path in GUIDES for step in steps(path)]
    build_wheel(site)
    make_certificate(site)
    (site.base / "home").mkdir(mode=0o755)
    site.root_dir.mkdir(mode=0o700)
    home = ["--create-home", "--home-dir", str(site.home), "--shell", "/bin/bash"]
    checked(["useradd", *home, site.account])
    # A site's functional account has no password but is not locked ("!", useradd's
    # default): OpenSSH refuses a locked account whatever its keys.
    checked(["usermod", "--password", "*", site.account])
    processes = [start_sshd(site)]
    outputs: dict[str, str] = {}
    try:
        for step in guide:
            if "sites-available" in step.attrs.get("path", ""):
                do_step(site, step)
                processes.append(start_nginx(site))
                continue
            if step.where.startswith("operations.md") and site.job_id == "4711":
                site.job_id = first_job(site)
            outputs[step.where] = do_step(site, step)
        check_outputs(site, outputs)
    finally:
        stop_all(site, processes)
    print(f"the guides ran in {time.monotonic() - started:.0f} s ({len(guide)} steps)")


def first_job(site: Site) -> str:
    status = json.loads((site.home / "saia" / "state" / "status.json").read_text())
    return str(status["jobs"][0]["job_id"])


def check_outputs(site: Site, outputs: dict[str, str]) -> None:
    """What the commands said (beyond their exit codes)."""
    answer = next(out for where, out in outputs.items() if '"choices"' in out)
    assert json.loads(answer)["choices"][0]["message"]["content"]
    text = "\n".join(outputs.values())
    assert ": ok: 1 service(s)" in text  # check-config
    assert "config reloaded: services llama-3.1-8b-instruct" in text
    assert re.search(r"^id +state +owner +models +expires", text, re.MULTILINE)  # keys list
    assert "llama-3.1-8b-instruct" in text and "ready" in text  # status
    database = site.base / "var/lib/saia/hub.db"
    assert database.stat().st_mode & 0o777 == 0o600
