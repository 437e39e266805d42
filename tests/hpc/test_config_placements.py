"""Candidate placements of a service, time_min and the placement knobs in the agent config."""

from __future__ import annotations

from typing import Any

import pytest

from hpc.config import ConfigError, ServiceConfig, parse_config
from hpc.jobs.script import sbatch_lines
from hpc.jobs.system import JobTag

TAG = JobTag(prefix="saia", agent_id="login1")


def service(**fields: Any) -> ServiceConfig:
    data = {"name": "m", "model": "/models/m", **fields}
    return parse_config({"state_dir": "/srv/saia", "services": [data]}).services[0]


def error(**fields: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        service(**fields)
    return str(caught.value)


def test_without_placements_the_service_has_its_resources_as_one_placement() -> None:
    plain = service(resources={"partition": "gpu", "qos": "normal"})
    (only,) = plain.candidates
    assert (only.name, only.partition, only.qos, only.preemptible) == ("", "gpu", "normal", False)
    assert plain.placed("") is plain
    config = parse_config({"state_dir": "/s", "services": []})
    assert config.placement_probe_interval == 60.0
    assert plain.replace_pending_gain == 300.0
    assert plain.resources.time_min is None


def test_placements_inherit_unset_fields_and_get_derived_names() -> None:
    placed = service(
        resources={"partition": "gpu", "qos": "normal"},
        placements=[
            {"reservation": "floor"},
            {"partition": "scavenger", "qos": "burst", "preemptible": True},
            {"name": "big", "partition": "a100"},
        ],
    )
    assert [(p.name, p.slurm_key, p.preemptible) for p in placed.candidates] == [
        ("gpu/normal@floor", ("gpu", "normal", "floor"), False),
        ("scavenger/burst", ("scavenger", "burst", ""), True),
        ("big", ("a100", "normal", ""), False),
    ]
    burst = placed.placed("scavenger/burst").resources
    assert (burst.partition, burst.qos, burst.reservation) == ("scavenger", "burst", None)
    with pytest.raises(ValueError, match="no placement 'nope'"):
        placed.placed("nope")


def test_the_chosen_placement_is_on_the_job() -> None:
    placed = service(
        resources={"partition": "gpu", "time_limit": "2:00:00", "time_min": "30:00"},
        placements=[{"qos": "burst", "reservation": "r1"}],
    )
    config = parse_config({"state_dir": "/srv/saia", "services": []})
    lines = sbatch_lines(placed.placed("gpu/burst@r1"), config, TAG)
    assert "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --qos=burst" in lines
    assert "#SBATCH --reservation=r1" in lines
    assert "#SBATCH --time=0-02:00:00" in lines
    assert "#SBATCH --time-min=0-00:30:00" in lines
    # the stop warning must fit the shortest limit Slurm may grant
    assert "#SBATCH --signal=B:TERM@60" in lines


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"placements": [{}]}, "a placement names a partition, a qos or a reservation"),
        (
            {"placements": [{"partition": "a", "name": "x"}, {"partition": "b", "name": "x"}]},
            "placement name 'x' is used twice",
        ),
        (
            {"placements": [{"partition": "a"}, {"partition": "a", "name": "again"}]},
            "placements 'a' and 'again' ask Slurm for the same place",
        ),
        (
            {"placements": [{"partition": "a", "preemptible": True}]},
            "min_instances needs a placement that is not preemptible",
        ),
        ({"placements": [{"partition": "a", "name": "bad name"}]}, "use letters"),
        ({"resources": {"time_min": "UNLIMITED"}}, "time_min must be a finite"),
        ({"resources": {"time_min": "2:00:00"}}, "time_min must not be longer than time_limit"),
        (
            {"resources": {"time_min": "5:00"}, "renewal_lead": "10m"},
            "renewal_lead must be shorter than resources.time_min",
        ),
        ({"resources": {"extra_sbatch": ["--time-min=5"]}}, "--time-min is set by the agent"),
        ({"replace_pending_gain": 0}, "replace_pending_gain"),
    ],
)
def test_bad_placements_get_one_clear_line(fields: dict[str, Any], message: str) -> None:
    text = error(**fields)
    assert message in text
    assert len(text.splitlines()) == 1


def test_a_preemptible_only_service_may_scale_from_zero() -> None:
    burst = service(min_instances=0, placements=[{"partition": "scav", "preemptible": True}])
    assert burst.candidates[0].preemptible
