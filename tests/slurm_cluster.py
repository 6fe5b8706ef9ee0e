"""A live single-node SLURM cluster on this machine, for the ``cluster`` test tier.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages (installed with
apt-get when missing), a munge key and a minimal ``slurm.conf`` for this host under a
temporary directory, and the three daemons (``munged``, ``slurmctld``, ``slurmd``) started in
the foreground as our own child processes, so they are stopped by their pids at the end.

Nothing is shared with a system installation: munged gets its own socket, key, pid, seed
and log files (its command-line options), slurm its own ports, state, spool, pid and log
paths, and every client command finds the cluster through ``SLURM_CONF``. The controller and
the node are this host's short name on the loopback address.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")
# Job states after which a job no longer runs (REQUEUED and PENDING are not among them).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def ensure_installed(timeout: float = 600) -> None:
    """Install the SLURM and munge packages with apt-get when a program is missing."""
    if all(shutil.which(p) for p in PROGRAMS):
        return
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and no apt-get to "
                                 f"install {' '.join(PACKAGES)}")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and installing "
                                 f"{' '.join(PACKAGES)} with apt-get needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if missing:
        raise ClusterUnavailable(f"{', '.join(missing)} still missing after installing "
                                 f"{' '.join(PACKAGES)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself detects them, so the node never drains
    for having less than configured."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
    cpus = re.search(r"\bCPUs=(\d+)", out)
    mem = re.search(r"\bRealMemory=(\d+)", out)
    if not (cpus and mem):
        raise ClusterUnavailable(f"slurmd -C did not report CPUs and memory: {out.strip()!r}")
    return int(cpus.group(1)), int(mem.group(1))


def parse_fields(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (``Key=Value`` pairs) as a dict."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, configured under ``root``.

    Args:
        root: an empty directory for the key, the config, state, spool, pids and logs.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.cpus, self.mem_mb = 0, 0
        self._held_since: dict[str, float] = {}  # job -> when first seen held after requeue

    # ------------------------------------------------------------------ set-up
    def _write_munge_key(self) -> Path:
        d = self.root / "munge"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        return key

    def _write_conf(self) -> None:
        self.cpus, self.mem_mb = _node_hardware()
        dirs = {name: self.root / name for name in ("state", "spool")}
        for d in [*dirs.values(), self.logs]:
            d.mkdir(parents=True, exist_ok=True)
        lines = {
            "ClusterName": "attnkit-test",
            "SlurmctldHost": f"{self.host}(127.0.0.1)",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "CredType": "cred/munge",
            "StateSaveLocation": dirs["state"],
            "SlurmdSpoolDir": dirs["spool"],
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.logs / "slurmctld.log",
            "SlurmdLogFile": self.logs / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin",
            "SchedulerParameters": "sched_interval=2",  # pending jobs looked at every 2 s
            "ReturnToService": 2,
            "MpiDefault": "none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MailProg": "/bin/true",
            "JobRequeue": 1,
            "KillWait": 5,         # seconds between SIGTERM and SIGKILL when a job ends
            "MinJobAge": 3600,     # keep finished jobs visible to scontrol for the tests
            "InactiveLimit": 0,
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 30,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                 f"RealMemory={self.mem_mb} State=UNKNOWN\n"
                 f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE "
                 f"State=UP\n")
        self.conf.write_text(text)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment pointed at the cluster, without the variables of any
        SLURM job the tests themselves may run in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()
        time.sleep(0.3)
        if self.procs[name].poll() is not None:
            raise ClusterUnavailable(f"{name} exited at start ({self.procs[name].returncode}): "
                                     f"{self.tail(name)}")

    def start(self, timeout: float = 60) -> None:
        """Write the key and config, start the daemons and wait until the node is idle."""
        key = self._write_munge_key()
        self._write_conf()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                               f"--log-file={self.logs / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged to open its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.sinfo(), timeout, "the node to become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if ready():
                return
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({p.returncode}) while waiting for "
                                             f"{what}: {self.tail(name)}")
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}; "
                                 f"sinfo: {self.sinfo()!r}; {self.tail('slurmd')}")

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started, by their pids."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env,
                           capture_output=True, timeout=30)
            t_end = time.time() + 30
            while time.time() < t_end and self.command("squeue", "-h", check=False).strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    # ------------------------------------------------------------------ use
    def command(self, *cmd: str, check: bool = True, timeout: float = 30,
                env: dict[str, str] | None = None) -> str:
        """Run a client command against this cluster (``env``: ``self.env`` by default;
        sbatch passes it on to the job)."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env or self.env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def sinfo(self) -> str:
        try:
            return self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return ""

    def sbatch(self, script: Path, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a batch script with ``env`` (it must hold ``SLURM_CONF``, as ``self.env``
        does); returns the job id."""
        out = self.command("sbatch", "--parsable", *args, str(script), env=env)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        return parse_fields(self.command("scontrol", "show", "job", "-o", job_id))

    def wait_job(self, job_id: str, timeout: float, on_poll=None,
                 interval: float = 1.0) -> dict[str, str]:
        """Wait until the job has finished; returns its fields. ``on_poll(fields)`` is called
        on every poll (every ``interval`` seconds) while it has not.

        slurmctld holds a requeued job for about two minutes (its begin time, measured 145 s
        on slurm 22.05); here it starts again two seconds after it is seen held
        (``release_requeued``)."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            fields = self.job(job_id)
            if fields.get("JobState") in FINISHED:
                return fields
            self.release_requeued(job_id, fields)
            if on_poll is not None:
                on_poll(fields)
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after "
                           f"{timeout:.0f} s")

    def release_requeued(self, job_id: str, fields: dict[str, str],
                         settle: float = 2.0) -> None:
        """Start a requeued job held for its begin time, ``settle`` seconds after it was
        first seen held. At once is too early: slurmctld revokes the job's credential when it
        requeues it, and a new start within the same second is refused ("Job credential
        revoked"; the job then ends FAILED)."""
        if fields.get("JobState") != "PENDING" or fields.get("Reason") != "BeginTime":
            self._held_since.pop(job_id, None)
            return
        first = self._held_since.setdefault(job_id, time.time())
        if time.time() - first >= settle:
            self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            self._held_since.pop(job_id, None)

    def tail(self, name: str, lines: int = 15) -> str:
        """The end of a daemon's log, for failure messages."""
        text = ""
        for path in (self.logs / f"{name}.log", self.logs / f"{name}.stdout"):
            if path.is_file():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"[{name}] {text or '(no log)'}"
