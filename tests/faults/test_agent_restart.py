"""An agent restart under load keeps what it knew and cuts no stream (issue 18).

The agent runs as in production (no --drain-on-exit). Under a load that holds three
instances (min 1), it gets SIGTERM: it saves its state (load history included), hands the
leader lock over at once and finishes the streams in flight on its connections, while
the hub, told by the old agent's first refusal, connects anew, and the relay starts the
next agent, which adopts the jobs and takes every new request. Targets: no request fails,
and no instance is drained before scale_down_delay after the load ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running
from tests.faults.load import loaded, streams_answering, streams_started
from tests.faults.test_hop_faults import leader_pid
from tests.hpc.helpers import until

LOOK_BACK, DELAY = 10.0, 20.0
SERVICE = {
    "name": "warm",
    "min_instances": 1,
    "max_instances": 3,
    "target_concurrency": 2,
    "look_back": f"{LOOK_BACK:.0f}s",
    "scale_down_delay": f"{DELAY:.0f}s",
}


class ProductionChain(FaultChain):
    """The fault chain with the agent as production runs it: jobs outlive it."""

    def _spawn(self, name: str, argv: list[str]) -> None:
        super()._spawn(name, [arg for arg in argv if arg != "--drain-on-exit"])

    def stop(self) -> list[str]:
        """The hub (else it reconnects and a relay starts an agent), the agents, then
        what a drain on exit would have done: cancel the jobs."""
        self.stop_hub_and_agents()
        self.cluster.run(["scancel", f"--name={self.prefix}-warm"])
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and self.cluster.run(
                ["squeue", "--noheader", f"--name={self.prefix}-warm"]
            ).stdout.strip()
        ):
            time.sleep(0.5)
        return super().stop()


@pytest.fixture(scope="module")
def chain(
    slurm_cluster: SlurmSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProductionChain]:
    chain = ProductionChain(tmp_path_factory.mktemp("restart"), slurm_cluster, [SERVICE])
    with running(chain):
        yield chain


def status(chain: FaultChain) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((chain.state_dir / "status.json").read_text()))
    return {"services": [], "jobs": []}


def serving(chain: FaultChain) -> tuple[int, list[str]]:
    """Ready jobs of the service, and the jobs draining or cancelled."""
    jobs = status(chain)["jobs"]
    ready = sum(1 for j in jobs if j["ready"] and not j["draining"] and not j["cancelled"])
    return ready, [j["job_id"] for j in jobs if j["draining"] or j["cancelled"]]


async def test_restart_under_load_keeps_capacity_and_every_stream(chain: ProductionChain) -> None:
    load = chain.load("warm", clients=6, duration=300, max_tokens=64, stream_every=1)
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    async with loaded(load, stop) as result:
        await until(lambda: serving(chain)[0] == 3, 120, "three instances under load")
        await streams_started(result, 4)
        old = chain.processes["agent"]
        in_flight = streams_answering(result)
        old.send_signal(signal.SIGTERM)
        restarted = loop.time()
        await until(lambda: leader_pid(chain.state_dir) not in (None, old.pid), 30, "new agent")
        took_over = loop.time() - restarted
        await asyncio.sleep(10)  # the load goes on through the new agent
        stop.set()
    load_ended = max(o.ended or 0.0 for o in result.outcomes)
    failed = [o for o in result.outcomes if o.kind != "ok"]
    assert not failed, f"{len(failed)} of {len(result.outcomes)} failed: {result.summary()}"
    assert old.wait(60) == 0  # the old agent finished its streams, then exited
    after = [o for o in result.outcomes if o.started > restarted]
    print(
        f"  restart with {in_flight} streams in flight: {len(result.outcomes)} requests, "
        f"0 failed ({len(after)} after the SIGTERM); the next agent led after {took_over:.1f}s"
    )
    # No instance drained while the load's window (look_back + scale_down_delay) holds them.
    while loop.time() < load_ended + DELAY:
        ready, stopping = serving(chain)
        assert (ready, stopping) == (3, []), f"{loop.time() - load_ended:.1f}s after the load"
        await asyncio.sleep(0.5)
    await until(lambda: serving(chain)[0] == 1, LOOK_BACK + 60, "scaled down to min_instances")
    print(f"  scaled down {loop.time() - load_ended:.1f}s after the load ended")


def test_agent_log_shows_the_hand_over(chain: ProductionChain) -> None:
    text = Path(chain.root / "agent.log").read_text(errors="replace")
    assert "the next agent may lead; finishing the streams in flight" in text
    assert "Traceback" not in text
