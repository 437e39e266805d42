"""The live catalog (hub/upstreams/catalog.py, pure): configured models first, then the services the
agents report that no configured model names."""

from __future__ import annotations

from hub.config import parse_config
from hub.upstreams.base import ModelState
from hub.upstreams.catalog import catalog

SITE = {"socket": "/tmp/agent.sock"}


def test_reported_services_become_models_and_config_entries_override() -> None:
    config = parse_config(
        {
            "upstreams": {
                "a": {"kind": "hpc", "sites": [SITE]},
                "b": {"kind": "hpc", "sites": [SITE]},
                "fixed": {"kind": "hpc", "sites": [SITE], "discover": False},
            },
            "models": [
                {"id": "public", "upstream": "a", "upstream_model": "aliased", "name": "P"},
                {"id": "configured", "upstream": "a"},
            ],
        }
    )
    ready = ModelState("ready", 0.0)
    states = {
        "a": {"aliased": ready, "configured": ready, "new-a": ready, "twice": ready},
        "b": {"new-b": ready, "twice": ready, "bad id!": ready},
        "fixed": {"hidden": ready},
    }
    models = catalog(config, states)
    assert [(m.id, m.upstream, m.target) for m in models] == [
        ("public", "a", "aliased"),
        ("configured", "a", "configured"),
        ("new-a", "a", "new-a"),
        ("twice", "a", "twice"),  # the first upstream reporting an id serves it
        ("new-b", "b", "new-b"),
    ]
    assert [m.id for m in catalog(config, {})] == ["public", "configured"]
