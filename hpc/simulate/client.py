"""The clients in front of the router: what a model client does with a 503, and what its
user feels.

A rejected request is not the end for its user: model clients (the OpenAI SDKs, LangChain,
scripts) retry a 503 after the Retry-After the server gives, or after their own back-off
when it gives none, until they give up. The user's wait ("felt wait") runs from the first
attempt until an attempt gets a slot; a request given up counts as `give_up` seconds, a
lower bound of what its user felt (they got nothing). Both policies face the same clients;
only what their routers answer differs (the agent's router sends Retry-After, the
baseline's sends none).

Pure: an attempt and a seeded random draw in, the next attempt's time (or None) out.
"""

from __future__ import annotations

import random

from pydantic import Field

from saia.base.config_file import Duration, Strict

# The router clamps Retry-After to this (hpc.router.forwarding.retry_after).
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1.0, 300.0


class ClientModel(Strict):
    """How clients retry a 503 (`client:` in the simulator's config)."""

    retry: bool = Field(True, description="clients retry a 503; false: a 503 is final")
    give_up: Duration = Field(600.0, ge=0, description="no retry later than this after the first")
    backoff: Duration = Field(2.0, gt=0, description="first wait when no Retry-After is given")
    backoff_max: Duration = Field(60.0, gt=0, description="longest wait of that back-off")
    jitter: float = Field(0.1, ge=0, le=1, description="each wait is spread by +- this fraction")


def retry_after(seconds: float) -> float:
    """What the agent's router sends for an expected wait: whole seconds, 1 to 300."""
    return float(max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, round(seconds))))


def next_attempt(
    client: ClientModel,
    rng: random.Random,
    *,
    origin: float,
    now: float,
    attempt: int,
    retry_after_s: float | None,
) -> float | None:
    """When the client sends attempt `attempt + 1` of a request first sent at `origin` and
    rejected `now`; None when it gives up (no retries, or past `give_up`)."""
    if not client.retry:
        return None
    if retry_after_s is None:  # the client's own back-off: doubling from `backoff`
        wait = min(client.backoff * 2**attempt, client.backoff_max)
    else:
        wait = retry_after_s
    wait *= 1 + client.jitter * (2 * rng.random() - 1)
    at = now + wait
    return at if at - origin <= client.give_up else None
