"""Group budgets against their use (issue 11, item 5): `saia hub usage --by group` and
GET /admin/usage/groups, on a real hub and database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path

from click.testing import CliRunner

from hub.cli import hub as hub_cli
from hub.config import LimitsConfig, load_config
from hub.usage.budgets import budget_rows
from hub.usage.limits import window_bounds
from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import ADMIN_TOKEN, running_hub

NOW = 1_800_000_000.0
BUDGETS = {
    "physics": LimitsConfig(requests_per_day=5, tokens_per_month=1000),
    "chemistry": LimitsConfig(requests_per_minute=2, concurrent=3),
    "biology": LimitsConfig(concurrent=1),  # no window: nothing to show
}


def test_budget_rows_show_each_limited_window_with_its_use_and_reset() -> None:
    rows = budget_rows(BUDGETS, {("physics", "day"): (3, 40), ("physics", "month"): (9, 400)}, NOW)
    assert [(r["group"], r["window"]) for r in rows] == [
        ("chemistry", "minute"), ("physics", "day"), ("physics", "month"),
    ]  # fmt: skip
    chemistry, day, month = rows
    assert chemistry["requests"] == 0 and chemistry["requests_limit"] == 2
    assert chemistry["tokens"] is None and chemistry["tokens_limit"] is None
    assert (day["requests"], day["requests_limit"], day["tokens_limit"]) == (3, 5, None)
    assert (month["tokens"], month["tokens_limit"], month["requests_limit"]) == (400, 1000, None)
    assert day["resets_at"] == window_bounds("day", NOW)[1]


def write_config(tmp_path: Path, upstream: str, database_url: str) -> Path:
    path = tmp_path / "hub.yaml"
    limits = {name: limits.model_dump(exclude_none=True) for name, limits in BUDGETS.items()}
    path.write_text(json.dumps({  # JSON is YAML
        "data_dir": str(tmp_path / "data"),
        "database_url": database_url,
        "usage_flush_interval": 0.2,
        "upstreams": {"local": {"kind": "openai", "base_url": f"{upstream}/v1"}},
        "models": [{"id": STANDIN_MODEL, "upstream": "local"}],
        "auth": {"group_limits": limits},
    }))  # fmt: skip
    return path


async def use_physics(config_path: Path) -> list[dict[str, object]]:
    """Three requests of a physics key; the admin API's rows once the hub has synced."""
    async with running_hub(load_config(config_path, {})) as hub:
        key = await hub.create_key(group="physics")
        body = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 2}
        async with hub.client(key) as http:
            for _ in range(3):
                assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert hub.services.counter_sync is not None
        await hub.services.counter_sync.sync()
        await hub.services.recorder.flush()
        async with hub.client(ADMIN_TOKEN) as admin:
            answer = await admin.get("/admin/usage/groups")
        async with hub.client(key) as http:
            assert (await http.get("/admin/usage/groups")).status_code in (401, 403)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, object]] = answer.json()
    return rows


def test_group_use_in_the_admin_api_and_the_cli(
    tmp_path: Path, database_url: str, standin_server: str
) -> None:
    config = write_config(tmp_path, standin_server, database_url)
    rows = asyncio.run(use_physics(config))
    by_window = {(r["group"], r["window"]): r for r in rows}
    day = by_window["physics", "day"]
    assert (day["requests"], day["requests_limit"]) == (3, 5)
    month = by_window["physics", "month"]
    assert month["tokens"] == 3 * 5 and month["tokens_limit"] == 1000  # 3 prompt + 2 each
    assert by_window["chemistry", "minute"]["requests"] == 0
    assert int(str(day["resets_at"])) > time.time()

    table = CliRunner().invoke(hub_cli, ["usage", "-c", str(config), "--by", "group"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "group", "window", "requests", "requests_limit", "tokens", "tokens_limit", "resets_at",
    ]  # fmt: skip
    assert lines[2].split()[:6] == ["physics", "day", "3", "5", "15", "-"]  # tokens: no limit
    as_csv = CliRunner().invoke(hub_cli, ["usage", "-c", str(config), "--by", "group", "--csv"])
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert parsed[2]["window"] == "month" and parsed[2]["tokens"] == "15"


def test_without_budgets_or_since_the_cli_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n")
    for args, expected in (
        (["--by", "group"], "no group budgets are configured (auth.group_limits)"),
        (["--by", "user"], "--since is required"),
    ):
        result = CliRunner().invoke(hub_cli, ["usage", "-c", str(path), *args])
        assert result.exit_code == 2
        assert len(result.stderr.splitlines()) == 1 and expected in result.stderr
