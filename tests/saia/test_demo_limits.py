"""The demo's key has per-minute and per-day limits: a client reading the rate-limit headers
(GWDG's SDK, `get_rate_limits()`) sees them from the first request."""

from __future__ import annotations

import signal
from pathlib import Path

import openai
import pytest

from saia.demo import DEMO_LIMITS
from tests.saia.test_demo import running_demo

pytestmark = pytest.mark.e2e


def test_demo_key_announces_its_limits(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--local") as local:
        client = openai.OpenAI(base_url=local.base_url, api_key=local.key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "limits?"}]
        )
        assert raw.parse().choices[0].message.content
        per_minute, per_day = DEMO_LIMITS[1], DEMO_LIMITS[3]
        assert raw.headers["x-ratelimit-limit-minute"] == per_minute
        assert raw.headers["x-ratelimit-limit-day"] == per_day
        assert int(raw.headers["x-ratelimit-remaining-minute"]) == int(per_minute) - 1
        local.process.send_signal(signal.SIGINT)
        assert local.process.wait(90) == 0
