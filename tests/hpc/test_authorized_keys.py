"""The authorized_keys line of `saia hpc authorized-keys`, and its CLI."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.authorized_keys import (
    RELAY_PATH,
    KeyLineError,
    authorized_keys_line,
    read_public_key,
    relay_argv,
)
from hpc.cli import hpc


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "hub_ed25519"
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hub", "-f", str(path)]
    subprocess.run(argv, check=True, timeout=30)
    return path.with_suffix(".pub")


def options_of(line: str) -> tuple[str, str]:
    """The forced command as sshd reads it (only \\" is an escape) and what follows it."""
    prefix = 'restrict,command="'
    assert line.startswith(prefix)
    command, index = "", len(prefix)
    while line[index] != '"':
        if line[index] == "\\" and line[index + 1] == '"':
            index += 1
        command += line[index]
        index += 1
    return command, line[index + 1 :]


def test_line_forces_the_relay(public_key: Path) -> None:
    key = read_public_key(public_key)
    argv = relay_argv("/usr/bin/python3", Path("/srv/saia state"), ["/opt/saia", "-c", "a'b\"c"])
    line = authorized_keys_line(key, argv, "10.0.0.0/8, 192.168.1.1")
    assert "\n" not in line
    command, rest = options_of(line)
    assert shlex.split(command) == argv
    assert argv[:5] == ["/usr/bin/python3", "-I", "-S", str(RELAY_PATH), "--state-dir"]
    assert rest == f',from="10.0.0.0/8,192.168.1.1" {key} saia-hub'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n", "private key"),
        ("", "exactly one"),
        ("ssh-ed25519 AAAA\nssh-ed25519 AAAA\n", "exactly one"),
        ("ssh-dss AAAAB3NzaC1kc3M= x\n", "not an OpenSSH public key"),
        ("ssh-ed25519 not-base64!\n", "not valid"),
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==\n", "does not match"),
    ],
)
def test_bad_keys(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "key.pub"
    path.write_text(content)
    with pytest.raises(KeyLineError, match=message):
        read_public_key(path)


def test_bad_from_and_line_breaks(public_key: Path) -> None:
    key = read_public_key(public_key)
    with pytest.raises(KeyLineError, match="not an address"):
        authorized_keys_line(key, ["/x"], "example.org")
    with pytest.raises(KeyLineError, match="line breaks"):
        authorized_keys_line(key, ["/x", "a\nb"])


def test_cli_prints_one_line(public_key: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    runner = CliRunner()
    result = runner.invoke(hpc, ["authorized-keys", "--key", str(public_key), "-c", str(config)])
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    command, _ = options_of(line)
    argv = shlex.split(command)
    assert argv[argv.index("--state-dir") + 1] == str(tmp_path / "state")
    assert shlex.split(argv[argv.index("--agent") + 1])[-4:] == ["hpc", "agent", "-c", str(config)]


def test_cli_refuses_a_private_key(public_key: Path) -> None:
    private = public_key.with_suffix("")
    result = CliRunner().invoke(
        hpc, ["authorized-keys", "--key", str(private), "--state-dir", "/tmp/s"]
    )
    assert result.exit_code == 2
    assert "private key" in result.output
    assert "Traceback" not in result.output
