"""What the SSH hop costs: HopClient -> sshd -> relay -> router -> stand-in, against direct
calls to the same stand-in (httpx, and the router's own lean client, which shows what the
hop adds without httpx's pool overhead), alternating in one run. Prints figures only.

    .venv/bin/python bench/hop.py [--sequential 400] [--concurrent 64] [--requests 2000]
        [--backend-tls]

Runs everything on 127.0.0.1: a stand-in server, a throw-away sshd with the forced-command
key, and the agent's router in its own process (as on a login node). `--backend-tls`
serves the stand-in with its own certificate, as a job does (backend_tls), and publishes
it as https pinned to it: the router's (and the direct calls') TLS cost; the router's
connections to the stand-in are counted (each one is a TLS handshake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx

# bench/hub.py would shadow the `hub` package when this runs as a script: repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hub.upstreams.hop_client import HopClient, HopTarget
from saia.base.http11 import HttpClient
from saia.base.pinned_tls import pinned_context
from saia.sandbox.certs import make_certificate
from saia.sandbox.process import free_port, stop_process
from saia.sandbox.sshd import SshdSandbox

MODEL = "bench-model"
BODY = json.dumps(
    {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()
HEADERS = [("content-type", "application/json")]

Call = Callable[[], Awaitable[None]]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every descendant of `pid`."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append((int(entry.name), name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def connected_ports(pid: int, port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections to 127.0.0.1:`port` (IPv4)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in lines:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == port:
            found.add(int(local.split(":")[1], 16))
    return found


class CpuMeter:
    """CPU seconds of each process of the hop, grouped (the sshd tree split by name), and
    the router's connections to the stand-in seen at each sample (keep-alive: few)."""

    def __init__(self, router: int, standin: int, sshd: int, backend_port: int) -> None:
        self.router, self.standin, self.sshd = router, standin, sshd
        self.backend_port = backend_port
        self.backend_connections: set[int] = set()

    def sample(self) -> dict[str, float]:
        self.backend_connections |= connected_ports(self.router, self.backend_port)
        sample = {
            "client": cpu_seconds(os.getpid()),
            "sshd": 0.0,
            "relay": 0.0,
            "router": cpu_seconds(self.router),
            "stand-in": cpu_seconds(self.standin),
        }
        for pid, name in children(self.sshd):
            sample["sshd" if name.startswith("sshd") else "relay"] += cpu_seconds(pid)
        return sample


def start_process(argv: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{argv[:3]} exited with {process.returncode}")
        if ready():
            return process
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{argv[:3]} did not start")


def healthy(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1, verify=verify).status_code == 200
    except httpx.TransportError:
        return False


try:  # the hub (uvicorn[standard]) and the agent run on uvloop when it is installed
    import uvloop

    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    LOOP = "uvloop"
except ImportError:
    new_loop, LOOP = asyncio.new_event_loop, "asyncio"


def run_router(state_dir: str, url: str, target: str, cert_file: str | None) -> None:
    """The agent's router alone (child process), with the stand-in published as ready
    (pinned to its certificate when it serves TLS)."""
    config = AgentConfig(
        state_dir=Path(state_dir),
        services=[ServiceConfig(name=MODEL, model=MODEL, target_concurrency=int(target))],
        router=RouterConfig(max_queue=4096),
    )
    registry = BackendRegistry()
    pem = Path(cert_file).read_text() if cert_file else None
    registry.publish(MODEL, [Backend(MODEL, "bench", url, certificate=pem)])
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve_requests(config, registry))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def sequential(calls: Mapping[str, Call], count: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(20):  # warm up every path
        for call in calls.values():
            await call()
    for _ in range(count):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - start) * 1000)
    print(f"sequential, {count} requests each, alternating (ms):")
    for name, values in times.items():
        print(
            f"  {name:12s} median {statistics.median(values):6.2f}   "
            f"p99 {percentile(values, 0.99):6.2f}"
        )
    hop = times["hop"]
    for name in (n for n in calls if n != "hop"):
        added_median = statistics.median(hop) - statistics.median(times[name])
        added_p99 = percentile(hop, 0.99) - percentile(times[name], 0.99)
        print(f"  added vs {name:12s} median {added_median:6.2f}   p99 {added_p99:6.2f}")


async def throughput(call: Call, workers: int, total: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(workers):
            tasks.create_task(worker())
    return total / (time.perf_counter() - start)


async def concurrent(
    calls: Mapping[str, Call], workers: int, total: int, rounds: int, meter: CpuMeter
) -> None:
    rates: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, dict[str, float]] = {name: {} for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            before = meter.sample()
            rates[name].append(await throughput(call, workers, total))
            for group, seconds in meter.sample().items():
                used = cpu[name].get(group, 0.0) + seconds - before[group]
                cpu[name][group] = used
    print(f"{workers} concurrent, {rounds} alternating rounds of {total} requests (req/s):")
    for name, values in rates.items():
        print(f"  {name:12s} " + "  ".join(f"{v:7.0f}" for v in values))
    for name in (n for n in calls if n != "hop"):
        ratio = statistics.median(rates["hop"]) / statistics.median(rates[name])
        print(f"  hop / {name:12s} (medians): {ratio:.2f}")
    seen = len(meter.backend_connections)
    print(f"router -> stand-in connections seen (each a handshake under TLS): {seen}")
    print("CPU ms per request in those rounds (client = this process):")
    for name, groups in cpu.items():
        shares = "  ".join(f"{g} {1000 * s / (rounds * total):5.3f}" for g, s in groups.items())
        print(f"  {name:12s} {shares}  total {1000 * sum(groups.values()) / (rounds * total):5.3f}")


async def measure(
    url: str,
    tls: ssl.SSLContext | None,
    sshd: SshdSandbox,
    meter: CpuMeter,
    args: argparse.Namespace,
) -> None:
    target = HopTarget(sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    http = httpx.AsyncClient(limits=limits, trust_env=False, verify=tls or True)
    async with (
        http,
        HttpClient(connect_timeout=10, header_encoding="utf-8") as lean,
        HopClient(target) as hop,
    ):

        async def direct() -> None:
            response = await http.post(f"{url}/v1/chat/completions", content=BODY, headers=HEADERS)
            assert response.status_code == 200, response.text

        async def direct_lean() -> None:
            response = await lean.send(url, "POST", "/v1/chat/completions", HEADERS, BODY, tls=tls)
            try:
                body = b"".join([chunk async for chunk in response.chunks()])
            finally:
                lean.release(response)
            assert response.status == 200, body

        async def via_hop() -> None:
            async with hop.stream(
                MODEL, "POST", "/v1/chat/completions", HEADERS, BODY, first_byte_timeout=30
            ) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert response.status == 200, body

        calls = {"direct-httpx": direct, "direct-lean": direct_lean, "hop": via_hop}
        await sequential(calls, args.sequential)
        await concurrent(calls, args.concurrent, args.requests, args.rounds, meter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=400)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--target-concurrency",
        type=int,
        default=0,
        help="the service's target_concurrency: how many requests the router sends the "
        "backend at once, queueing the rest fairly (default: --concurrent, so that the hop "
        "sends all at once like the direct paths and this measures the hop, not the queue)",
    )
    parser.add_argument(
        "--backend-tls",
        action="store_true",
        help="the stand-in serves TLS with its own certificate, pinned (as backend_tls)",
    )
    parser.add_argument(
        "--serve-router",
        nargs="+",
        metavar="STATE_DIR URL TARGET [CERT]",
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.serve_router:
        state_dir, url, target, *cert = args.serve_router
        run_router(state_dir, url, target, cert[0] if cert else None)
        return
    target = args.target_concurrency or args.concurrent
    os.environ.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "35")  # the stand-in's, as in a job
    with tempfile.TemporaryDirectory(prefix="saia-bench-hop-") as tmp:
        root = Path(tmp)
        port = free_port()
        argv = [sys.executable, "-m", "hpc.standin", "--host", "127.0.0.1", "--port", str(port)]
        route = [str(root / "state")]
        tls = None
        if args.backend_tls:
            cert = make_certificate(root / "tls")
            argv += ["--ssl-keyfile", str(cert.key_file), "--ssl-certfile", str(cert.cert_file)]
            tls = pinned_context(cert.pem)
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        route += [url, str(target)] + ([str(cert.cert_file)] if args.backend_tls else [])
        standin = start_process([*argv, "--model-name", MODEL], lambda: healthy(url, tls or True))
        router = start_process(
            [sys.executable, __file__, "--serve-router", *route],
            lambda: (root / "state" / SOCKET_NAME).exists(),
        )
        try:
            with SshdSandbox(root / "ssh", root / "state") as sshd:
                print(
                    f"relay python: {sshd.python}; cores: {os.cpu_count()}; loop: {LOOP}; "
                    f"router target_concurrency: {target}; backend TLS: {bool(tls)}"
                )
                assert sshd.process is not None
                meter = CpuMeter(router.pid, standin.pid, sshd.process.pid, port)
                with asyncio.Runner(loop_factory=new_loop) as runner:
                    runner.run(measure(url, tls, sshd, meter, args))
        finally:
            stop_process(router, 10)
            stop_process(standin, 10)


if __name__ == "__main__":
    main()
