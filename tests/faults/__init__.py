"""The fault-injection suite (`pytest -m faults`, issue 9).

The real chain, started once per test module (`fault_chain` in conftest.py, built by
chain.py): the hub (`saia hub serve`, SQLite) -> a real sshd whose key is forced to the
relay -> the agent (`saia hpc agent`) -> jobs on the sandbox Slurm cluster running the
stand-in model server. A test starts bounded load (load.py), injects one fault, and builds
a report (report.py) with the targets every fault test asserts: no request failed before
its first byte, none hung, only streams whose own backend died failed mid-stream, no
process or job leaked, no usage row lost or doubled; and how long until all was back.

A module declares the chain it needs: `SERVICES` (agent service entries, merged over
chain.BASE_SERVICE), and optionally `ROUTER` (agent router settings).
"""
