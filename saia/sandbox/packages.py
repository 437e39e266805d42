"""Ensure the Debian packages the project's real components need (Slurm, munge, sshd, ...).

`python -m saia.sandbox.packages [--for demo|test]` is instant when everything is installed:
it asks dpkg first and only runs apt-get (as root) for what is missing. Without root it says
what to install and exits 1 if something is missing. `demo` is what `saia demo` needs; `test`
(the default) adds what only the tests use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

# The demo's throw-away Slurm cluster and sshd.
DEMO_PACKAGES: list[str] = ["slurm-wlm", "munge", "openssh-server"]
# The tests add a PostgreSQL server (hub storage), a browser (chat page), and for the
# deployment guide's test nginx (the TLS proxy), openssl (its certificate) and systemd
# (`systemd-analyze verify` of the unit files in containers/systemd/).
TEST_PACKAGES: list[str] = [*DEMO_PACKAGES, "postgresql", "chromium", "nginx", "openssl", "systemd"]
PACKAGE_SETS: dict[str, list[str]] = {"demo": DEMO_PACKAGES, "test": TEST_PACKAGES}

DPKG_TIMEOUT = 60.0
APT_UPDATE_TIMEOUT = 600.0
APT_INSTALL_TIMEOUT = 1800.0


def is_installed(package: str) -> bool:
    """True when dpkg reports the package as installed."""
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        timeout=DPKG_TIMEOUT,
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip().endswith(" installed")


def missing_packages(packages: list[str]) -> list[str]:
    return [package for package in packages if not is_installed(package)]


def _apt(argv: list[str], timeout: float) -> int:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(argv, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"packages: {' '.join(argv)} did not finish within {timeout:.0f}s", flush=True)
        return 1


def ensure(packages: list[str]) -> int:
    """Install what is missing; returns the process exit code (0 = all present)."""
    missing = missing_packages(packages)
    if not missing:
        print(f"packages: all present ({', '.join(packages)})", flush=True)
        return 0
    names = " ".join(missing)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"packages: missing {names}; install them with: apt-get install -y {names}")
        return 1
    print("packages: apt-get update", flush=True)
    if _apt(["apt-get", "update"], APT_UPDATE_TIMEOUT) != 0:
        print("packages: apt-get update failed", flush=True)
        return 1
    print(f"packages: apt-get install {names}", flush=True)
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if _apt(argv, APT_INSTALL_TIMEOUT) != 0:
        print(f"packages: installing {names} failed", flush=True)
        return 1
    still = missing_packages(missing)
    if still:
        print(f"packages: still missing after install: {' '.join(still)}", flush=True)
        return 1
    print(f"packages: installed {names}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m saia.sandbox.packages",
        description="Install the Debian packages the demo or the tests need (root only).",
    )
    parser.add_argument(
        "--for",
        dest="purpose",
        choices=sorted(PACKAGE_SETS),
        default="test",
        help="demo: Slurm, munge, sshd; test (default): also PostgreSQL, chromium, nginx, ...",
    )
    sys.exit(ensure(PACKAGE_SETS[parser.parse_args(argv).purpose]))


if __name__ == "__main__":
    main()
