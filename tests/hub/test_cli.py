"""`saia hub` commands through click's runner, on a real SQLite database."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from hub.cli import hub


def write_config(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(
        text
        or "data_dir: data\nupstreams:\n  p: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  - {id: m1, upstream: p}\n  - {id: m2, upstream: p}\n"
    )
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(hub, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_key_lifecycle(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    code, out, err = run(
        "keys", "create", "-c", config, "--name", "lab key", "--user", "ann", "--group", "lab",
        "--model", "m1", "--expires", "30d", "--requests-per-minute", "10",
    )  # fmt: skip
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("sk-saia-") and "shown only now" in err
    key_id = secret[len("sk-saia-") : len("sk-saia-") + 12]
    code, out, _ = run("keys", "list", "-c", config)
    assert code == 0 and key_id in out and "active" in out and "ann" in out
    assert secret not in out
    code, out, _ = run("keys", "show", "-c", config, key_id)
    shown = json.loads(out)
    assert shown["allowed_models"] == ["m1"] and shown["limits"] == {"requests_per_minute": 10}
    assert shown["group"] == "lab" and shown["expires_at"] > shown["created_at"]
    assert run("keys", "revoke", "-c", config, key_id)[0] == 0
    code, _, err = run("keys", "revoke", "-c", config, key_id)
    assert code == 2 and err.strip() == f"no active key {key_id}"
    code, out, _ = run("keys", "list", "-c", config, "--json")
    assert json.loads(out)[0]["revoked_at"] is not None


def test_usage_csv_and_table_on_an_empty_database(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    code, out, _ = run("usage", "-c", config, "--since", "2026-11-01", "--by", "model", "--csv")
    assert code == 0 and out.splitlines()[0].startswith("model,requests,errors")
    code, out, _ = run("usage", "-c", config, "--since", "2026-11-01")
    assert code == 0 and "requests" in out


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    (tmp_path / "bad").mkdir()
    bad = str(write_config(tmp_path / "bad", "port: -1\n"))
    cases = [
        (("keys", "create", "-c", config, "--name", "x", "--model", "nope"), "--model: "),
        (("keys", "create", "-c", config, "--name", "x", "--expires", "soon"), "--expires: "),
        (("usage", "-c", config, "--since", "yesterday"), "--since/--until: "),
        (("keys", "list", "-c", str(tmp_path / "missing.yaml")), "cannot read"),
        (("db", "upgrade", "-c", bad), "port: "),
    ]
    for args, expected in cases:
        code, _, err = run(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (args, err)


def test_db_upgrade(tmp_path: Path) -> None:
    code, out, _ = run("db", "upgrade", "-c", str(write_config(tmp_path)))
    assert code == 0 and "up to date" in out
    assert (tmp_path / "data" / "hub.db").exists()


def test_serve_with_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    from saia.sandbox.process import free_port

    url = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none"
    config = write_config(
        tmp_path,
        f"database_url: '{url}'\nupstreams:\n  p: {{kind: openai, base_url: 'http://127.0.0.1:9'}}\n",
    )
    code, _, err = run("serve", "-c", str(config))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("database 127.0.0.1:") and "nobody" not in err
