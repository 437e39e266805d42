"""The authorized_keys line that pins the hub's key to the relay (`saia hpc authorized-keys`).

sshd runs a forced command through the account's shell, so every argv item is shell-quoted;
the whole command then sits inside command="..." where only `"` needs escaping.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import shlex
import struct
import sys
from pathlib import Path

from cloud_interface import relay

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
RELAY_PATH = Path(relay.__file__).resolve()


class KeyLineError(ValueError):
    """A public key or option that cannot go into authorized_keys; str() is one line."""


def read_public_key(path: Path) -> str:
    """`type base64` of an OpenSSH public key file (the comment is dropped)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise KeyLineError(f"{path}: cannot read the public key: {error}") from None
    if "PRIVATE KEY" in text:
        raise KeyLineError(f"{path}: this is a private key; give the .pub file")
    lines = text.splitlines()
    if len(lines) != 1:
        raise KeyLineError(f"{path}: expected exactly one public key line")
    parts = lines[0].split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise KeyLineError(f"{path}: not an OpenSSH public key (ssh-ed25519 AAAA...)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded = blob[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise KeyLineError(f"{path}: the key data is not valid") from None
    if embedded != parts[0]:
        raise KeyLineError(f"{path}: the key data does not match its type {parts[0]}")
    return f"{parts[0]} {parts[1]}"


def check_from(patterns: str) -> str:
    for item in patterns.split(","):
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise KeyLineError(f"--from: {item!r} is not an address or CIDR range") from None
    return ",".join(item.strip() for item in patterns.split(","))


def relay_argv(python: str, state_dir: Path, agent: list[str] | None) -> list[str]:
    argv = [python, "-I", "-S", str(RELAY_PATH), "--state-dir", str(state_dir)]
    if agent:
        argv += ["--agent", shlex.join(agent)]
    return argv


def authorized_keys_line(
    key: str, argv: list[str], from_cidr: str | None = None, comment: str = "saia-hub"
) -> str:
    for item in argv:
        if any(ch in item for ch in "\r\n\x00"):
            raise KeyLineError("the relay command may not contain line breaks")
    # OpenSSH un-escapes only \" inside command="..."; backslashes stay as they are.
    command = shlex.join(argv).replace('"', '\\"')
    options = f'restrict,command="{command}"'
    if from_cidr:
        options += f',from="{check_from(from_cidr)}"'
    return f"{options} {key} {comment}"


def default_python() -> str:
    """The login node's system python3 (fast start, no venv); else the agent's own."""
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def agent_command(config_path: Path) -> list[str]:
    """How the relay starts the agent: this installation's `saia hpc agent -c CONFIG`."""
    script = Path(sys.executable).with_name("saia")
    if script.exists():
        return [str(script), "hpc", "agent", "-c", str(config_path)]
    return [
        sys.executable,
        "-c",
        "from saia.cli import main; main()",
        "hpc",
        "agent",
        "-c",
        str(config_path),
    ]
