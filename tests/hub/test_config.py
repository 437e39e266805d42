"""Hub config: validation with one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.config import ConfigError, load_config, parse_config

GOOD = {
    "upstreams": {
        "openai": {"kind": "openai", "base_url": "https://api.example.org/v1", "api_key_env": "K"},
        "hpc": {
            "kind": "hpc",
            "sites": [
                {"host": "127.0.0.1", "user": "saia", "client_key": "/k", "known_hosts": "/h"}
            ],
        },
    },
    "models": [
        {"id": "gpt", "upstream": "openai", "upstream_model": "gpt-4o"},
        {"id": "llama", "upstream": "hpc", "hooks": {"max_tokens_cap": 512}},
    ],
    "auth": {"proxy_user_header": "X-Forwarded-User", "trusted_proxies": ["10.0.0.0/8"]},
}


def test_a_good_config_loads(tmp_path: Path) -> None:
    config = parse_config(GOOD, tmp_path / "hub.yaml")
    assert config.model("gpt") is not None and config.model("gpt").target == "gpt-4o"  # type: ignore[union-attr]
    assert config.data_dir.is_absolute()
    assert config.database.startswith("sqlite+aiosqlite:///")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"models": [{"id": "x", "upstream": "nowhere"}]}, "unknown upstream 'nowhere'"),
        ({"models": [{"id": "a", "upstream": "openai"}] * 2}, "configured twice"),
        ({"auth": {"trusted_proxies": ["not-a-net"]}}, "auth.trusted_proxies: "),
        ({"auth": {"proxy_user_header": "X-User"}}, "needs trusted_proxies"),
        ({"upstreams": {"o": {"kind": "openai", "base_url": "ftp://x"}}}, "upstreams.o"),
        ({"max_body_bytes": 5}, "max_body_bytes: "),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_each_problem_is_one_line_with_file_and_key(
    change: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**GOOD, **change}, "hub.yaml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith("hub.yaml: ") and expected in line for line in lines), lines


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+: not valid YAML"):
        load_config(broken)


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "hub" / "hub.example.yaml"
    config = load_config(example)
    assert {m.id for m in config.models} == {"llama-3.1-70b", "gpt-4o", "gpt-4o-azure"}
    assert config.auth.default_key_limits.requests_per_minute == 60
