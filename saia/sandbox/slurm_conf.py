"""The configuration files of the sandbox Slurm cluster (saia/sandbox/slurm.py): pure text."""

from __future__ import annotations

from pathlib import Path

GPUS = 4
# Partitions beside the default `gpu` (not preemptible), all on the one node, for the
# preemption tests (slurmctld without slurmdbd has no QOS objects, so partition tiers stand
# in for a guaranteed and a preemptible QOS): jobs in URGENT (tier 2) preempt jobs in BURST
# (tier 1, cancelled) and BURST_REQUEUE (tier 1, requeued); a preempted job's processes get
# SIGTERM at once and SIGKILL GRACE_TIME seconds later (plus KillWait).
BURST = "burst"
BURST_REQUEUE = "burst-requeue"
URGENT = "urgent"
GRACE_TIME = 20


# Settings every sandbox shares: root runs everything, no cgroups, no accounting.
FIXED_SETTINGS = (
    "SlurmUser=root",
    "SlurmdUser=root",
    "AuthType=auth/munge",
    "CredType=cred/munge",
    "SlurmctldDebug=info",
    "SlurmdDebug=info",
    "ProctrackType=proctrack/linuxproc",
    "TaskPlugin=task/none",
    "JobAcctGatherType=jobacct_gather/none",
    "AccountingStorageType=accounting_storage/none",
    "JobCompType=jobcomp/none",
    "MpiDefault=none",
    # Partition-priority preemption: only BURST* partitions are preemptible (gpu and URGENT
    # say PreemptMode=OFF); a valid cluster-wide mode is required once preemption is on.
    "PreemptType=preempt/partition_prio",
    "PreemptMode=CANCEL",
    "SlurmctldParameters=preempt_send_user_signal",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_Core",
    "SchedulerType=sched/backfill",
    "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000",
    "GresTypes=gpu",
    "MailProg=/bin/true",
    # Fast turnover for tests: finished jobs vanish quickly, kills do not linger.
    "MinJobAge=5",
    "KillWait=5",
    "MessageTimeout=10",
    "SlurmdTimeout=30",
    "InactiveLimit=0",
    "Waittime=0",
    "ReturnToService=2",
)


def render_slurm_conf(
    *,
    root: Path,
    cluster: str,
    host: str,
    ctld_port: int,
    slurmd_port: int,
    munge_socket: Path,
    cpus: int,
    memory_mb: int,
    overcommit: bool = False,
) -> str:
    """slurm.conf of a one-node cluster whose paths all live under `root`."""
    lines = [
        f"ClusterName={cluster}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        f"PlugStackConfig={root}/etc/plugstack.conf",
        *FIXED_SETTINGS,
        # More CPUs than the machine has (for many small test jobs): trust the config.
        *(["SlurmdParameters=config_overrides"] if overcommit else []),
        f"NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} "
        f"RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN",
        f"PartitionName=gpu Nodes={host} Default=YES MaxTime=INFINITE State=UP "
        "PriorityTier=1 PreemptMode=OFF",
        f"PartitionName={BURST} Nodes={host} MaxTime=INFINITE State=UP PriorityTier=1 "
        f"PreemptMode=CANCEL GraceTime={GRACE_TIME}",
        f"PartitionName={BURST_REQUEUE} Nodes={host} MaxTime=INFINITE State=UP PriorityTier=1 "
        f"PreemptMode=REQUEUE GraceTime={GRACE_TIME}",
        f"PartitionName={URGENT} Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 "
        "PreemptMode=OFF",
    ]
    return "\n".join(lines) + "\n"


def render_gres_conf(host: str, device_dir: Path) -> str:
    return f"AutoDetect=off\nNodeName={host} Name=gpu File={device_dir}/fakegpu[0-{GPUS - 1}]\n"
