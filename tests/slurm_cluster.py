"""A real single-node SLURM (Debian slurm-wlm + munge) on localhost for the tests.

Recipe of ``../shared/spec/slurm_notes.md``: munge with its own socket and key, slurmctld and
slurmd from a generated ``slurm.conf`` with every path under one scratch folder, no cgroups,
no accounting. Needs root and the packages (``.ci/run`` installs them). ~5-20 s to start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def available() -> str | None:
    """Why SLURM cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root"
    for exe in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "runuser"):
        if shutil.which(exe) is None:
            return f"{exe} not installed (apt-get install slurm-wlm munge)"
    return None


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


@contextmanager
def slurm_cluster():
    """Start munge, slurmctld and slurmd; yield the environment (SLURM_CONF...) for clients."""
    import tempfile

    reason = available()
    if reason:
        pytest.skip(f"SLURM test skipped: {reason}")
    # the munge user must traverse every parent: pytest's tmp folders are 0700, /tmp is not
    root = Path(tempfile.mkdtemp(prefix="msxplain-slurm-", dir="/tmp"))
    munge = root / "munge"
    munge.mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(munge, 0o755)  # munged refuses a 0700 socket folder
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o400)
    shutil.chown(munge, "munge", "munge")
    sock = munge / "munge.sock"
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={sock}", f"--key-file={key}",
                    f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}"], check=True, capture_output=True)
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    cpus = os.cpu_count() or 2
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=msxplain-test",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={sock}",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=batch_sched_delay=0",
        "MailProg=/bin/true",
        "ReturnToService=2",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"NodeName={host} CPUs={cpus} RealMemory={max(_total_memory_mb() - 1024, 1024)} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    env.setdefault("LOGNAME", "root")
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, capture_output=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state.startswith("idle"):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"SLURM did not come up (sinfo: {state!r}); see {root / 'log'}")
        yield env
    finally:
        for pidfile in (root / "slurmd.pid", root / "slurmctld.pid", munge / "munged.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)
