"""The live model catalog: the hub's configured models plus the services its agents report.

A service added to an agent's config (then `saia hpc reload`) is listed and served under
its own id without any hub config change; one removed from the agent leaves the catalog
once its agent stops reporting it. A configured model is an optional override (display
name, allow-lists, hooks, an alias) and is always listed (offline when nobody serves it).
Pure: the config and the upstreams' reported states in, the models out.
"""

from __future__ import annotations

from hub.config import MODEL_ID, HpcUpstreamConfig, HubConfig, ModelConfig
from hub.upstreams.base import ModelState


def discovering(config: HubConfig) -> set[str]:
    """The upstreams whose reported services become models (hpc upstreams with discover)."""
    return {
        name
        for name, upstream in config.upstreams.items()
        if isinstance(upstream, HpcUpstreamConfig) and upstream.discover
    }


def discovered_models(
    config: HubConfig, states: dict[str, dict[str, ModelState]]
) -> list[ModelConfig]:
    """Reported services that no configured model names, by id or as its upstream model on
    the same upstream; the first upstream (in config order) reporting an id serves it."""
    taken = {model.id for model in config.models}
    targets = {(model.upstream, model.target) for model in config.models}
    found = []
    for name in config.upstreams:
        if name not in discovering(config):
            continue
        for service in sorted(states.get(name, {})):
            if service in taken or (name, service) in targets or not MODEL_ID.match(service):
                continue
            taken.add(service)
            found.append(ModelConfig(id=service, upstream=name))
    return found


def catalog(config: HubConfig, states: dict[str, dict[str, ModelState]]) -> list[ModelConfig]:
    return [*config.models, *discovered_models(config, states)]
