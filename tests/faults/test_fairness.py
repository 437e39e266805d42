"""Fair shares under contention (issue 11), on the real chain: hub -> sshd -> relay -> agent ->
sandbox Slurm jobs of the stand-in, limited to 4 running requests at 20 ms per token.

Two services run the same stand-in: `fair` (fair queueing across users) and `fifo` (arrival
order, as before), so both are measured in the same run. One heavy user keeps 64 streams
open; four light users send one request at a time. Figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running
from tests.faults.fairness_load import Scenario, describe, run_scenario

RUNNING, TOKEN_DELAY, TOKENS = 4, 0.02, 10
STANDIN = {
    "target_concurrency": RUNNING,
    "server_args": ["--max-running", str(RUNNING), "--token-delay", str(TOKEN_DELAY)],
}
SERVICES = [{"name": "fair", **STANDIN}, {"name": "fifo", "queueing": "fifo", **STANDIN}]
TURNOVER = TOKENS * TOKEN_DELAY  # one request's time in a slot (its tokens)


@pytest.fixture(scope="module")
def chain(
    slurm_cluster: SlurmSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultChain]:
    chain = FaultChain(tmp_path_factory.mktemp("fair"), slurm_cluster, SERVICES, keys=5)
    with running(chain):
        yield chain


def scenario(chain: FaultChain, model: str) -> Scenario:
    heavy, *light = chain.keys
    return Scenario(chain.hub_url, model, heavy, light, max_tokens=TOKENS)


def test_light_users_wait_one_slot_turnover_not_the_heavy_users_queue(chain: FaultChain) -> None:
    alone = asyncio.run(run_scenario(scenario(chain, "fair"), heavy=False))
    fifo = asyncio.run(run_scenario(scenario(chain, "fifo")))
    fair = asyncio.run(run_scenario(scenario(chain, "fair")))
    for name, figures in (("alone", alone), ("fifo", fifo), ("fair", fair)):
        print(describe(name, figures))
        assert not figures.failures, figures.failures[:5]
        assert len(figures.light_ttft) == 4 * 6
    assert fifo.median >= 10 * fair.median, "fair queueing must cut light TTFT 10x"
    assert fair.median <= alone.median + TURNOVER, "a light user waits one slot turnover at most"
    # The heavy user gets every slot the light users leave free: nothing is lost to fairness.
    assert fair.total_rate >= 0.85 * fifo.total_rate
    assert fair.heavy_rate >= 0.5 * RUNNING / TOKEN_DELAY
