"""The relay's command grammar and argv parsing, and that it stays Python 3.8 compatible."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_interface import relay

RELAY = Path(relay.__file__)


def test_exact_commands_are_accepted() -> None:
    assert relay.parse_command("saia-relay 1") == "relay"
    assert relay.parse_command("saia-relay 1 ping") == "ping"


@pytest.mark.parametrize(
    "command",
    [
        None,
        "",
        "saia-relay 1 ",
        " saia-relay 1",
        "saia-relay 1; rm -rf /",
        "saia-relay 1 && touch /tmp/x",
        "saia-relay $(id)",
        "saia-relay `id`",
        "saia-relay 1\nid",
        "saia-relay 1 ../../etc/passwd",
        "SAIA-RELAY 1",
        "bash",
        "scp -t /tmp",
        "saia-relay 1" + " " * 1000,
    ],
)
def test_everything_else_is_refused(command: str | None) -> None:
    with pytest.raises(relay.RelayError) as caught:
        relay.parse_command(command)
    assert caught.value.code == relay.EXIT_USAGE
    assert "\n" not in str(caught.value)


def test_other_versions_are_named_as_such() -> None:
    with pytest.raises(relay.RelayError, match="unsupported"):
        relay.parse_command("saia-relay 2")


@given(st.text(max_size=300))
def test_grammar_accepts_exactly_two_strings(command: str) -> None:
    try:
        action = relay.parse_command(command)
    except relay.RelayError as error:
        assert error.code == relay.EXIT_USAGE
        assert command not in relay.COMMANDS
    else:
        assert relay.COMMANDS[command] == action


def test_argv() -> None:
    settings = relay.parse_argv(["--state-dir", "/s", "--agent", "/bin/a -c x"])
    assert (settings.state_dir, settings.agent, settings.start_timeout) == ("/s", "/bin/a -c x", 30)
    for bad in (["--state-dir", "rel"], ["--state-dir"], ["--other", "x"], []):
        with pytest.raises(relay.RelayError, match="relay configuration"):
            relay.parse_argv(bad)


def test_source_parses_as_python_3_8() -> None:
    ast.parse(RELAY.read_text(), feature_version=(3, 8))


def test_imports_only_the_stdlib() -> None:
    tree = ast.parse(RELAY.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= set(sys.stdlib_module_names) | {"__future__"}


def run_relay(tmp_path: Path, command: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    return subprocess.run(
        [sys.executable, "-I", "-S", str(RELAY), "--state-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_ping_and_refusal_as_a_process(tmp_path: Path) -> None:
    done = run_relay(tmp_path, "saia-relay 1 ping")
    assert (done.returncode, done.stdout) == (0, "saia-relay 1 pong\n")
    done = run_relay(tmp_path, "saia-relay 1; touch x")
    assert done.returncode == relay.EXIT_USAGE
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("saia-relay: error: command refused")
    assert list(tmp_path.iterdir()) == []


def test_no_agent_and_no_way_to_start_one(tmp_path: Path) -> None:
    done = run_relay(tmp_path, "saia-relay 1")
    assert done.returncode == 1
    assert "agent is not running" in done.stderr
