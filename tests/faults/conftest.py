"""Fixtures of the fault suite: the real chain, started once per test module.

A module names the services its chain runs (`SERVICES`, agent service entries merged over
`tests.faults.chain.BASE_SERVICE`; default: one service `faulty`) and may change the agent's
router settings (`ROUTER`). Every test under tests/faults/ is marked faults, e2e, slurm
and ssh, so `pytest -m faults` selects the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running

HERE = Path(__file__).parent
DEFAULT_SERVICES = [{"name": "faulty"}]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            for mark in ("faults", "e2e", "slurm", "ssh"):
                item.add_marker(mark)


@pytest.fixture(scope="module")
def fault_chain(
    request: pytest.FixtureRequest,
    slurm_cluster: SlurmSandbox,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultChain]:
    services = getattr(request.module, "SERVICES", DEFAULT_SERVICES)
    router = getattr(request.module, "ROUTER", None)
    chain = FaultChain(tmp_path_factory.mktemp("chain"), slurm_cluster, services, router)
    with running(chain):
        yield chain
