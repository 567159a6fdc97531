"""A real Slurm 22.05 cluster on one host for the tests: munged, slurmctld and two slurmd
"nodes" (research/dependencies.md §6).

    from tests.slurm_cluster import slurm_cluster      # session fixture: a started SlurmCluster
    job = slurm_cluster.sbatch(["-N", "2", "slurm/train.sbatch", ...])
    info = slurm_cluster.wait_job(job)              # {"JobState": "COMPLETED", ...}

Layout: everything lives in one fresh folder under /tmp (short, because munge's unix socket
path must fit in 108 bytes): its own munge key and socket, slurm.conf, state, spool, logs.
Nothing outside it is touched, so several sessions on one machine do not collide; the
ports are free ones picked at start. Nodes n1/n2 listen on their own ports with NodeAddr
127.0.1.1 / 127.0.2.1 (all of 127/8 is on `lo`), so a launcher that takes the first node's
address from `scontrol show node` is exercised as on a real cluster. A second partition
`gpu8` of eight 8-GPU nodes that never run (State=CLOUD, no slurmd) lets `sbatch --test-only`
judge a production-sized request. Daemons are stopped by their PIDs, never by name.

`python -m tests.slurm_cluster` starts one and waits (prints the SLURM_CONF to export), for
trying the launchers by hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.time_bounds import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "Slurm is not installed: run `slurm/install.sh` (apt-get install slurm-wlm munge) first"
NODES = {"n1": "127.0.1.1", "n2": "127.0.2.1"}
CPUS_PER_NODE = 2
GPU_PARTITION, GPU_NODES, GPUS_PER_GPU_NODE = "gpu8", 8, 8
# Seconds between the SIGTERM Slurm sends a job step's processes (scancel, time limit, a failed
# task under srun --kill-on-bad-exit) and its SIGKILL: the grace a stopped or stuck rank gets.
KILL_WAIT_SECONDS = 30
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


SBIN_DIRS = ["/usr/sbin", "/sbin"]  # where Debian installs the daemons


def with_sbin(path: str) -> str:
    """`path` (a PATH value) with SBIN_DIRS added where missing: a non-login or non-root PATH lacks
    them (`env -i PATH=/usr/bin:/bin` once found the daemons there, then failed to start slurmctld)."""
    dirs = path.split(os.pathsep)
    return os.pathsep.join(dirs + [d for d in SBIN_DIRS if d not in dirs])


def missing_binaries() -> list[str]:
    """Slurm/munge programs the cluster needs that are not installed (on PATH or in SBIN_DIRS)."""
    names = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel"]
    search = with_sbin(os.environ.get("PATH", os.defpath))
    return [n for n in names if not shutil.which(n, path=search)]


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (held open together so the kernel cannot hand one out twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))  # slurmd listens on 0.0.0.0:<Port>, so check the wildcard address
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started us dies, so a killed
    pytest does not leave daemons behind (PR_SET_PDEATHSIG; the daemons run in the foreground)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG



class SlurmCluster:
    """Config, daemons and small client helpers of one test cluster."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="famtron-slurm-"))
        self.name = f"ft{os.getpid()}"
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "sock"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port, self.port_n1, self.port_n2 = _free_ports(3)

    # ------------------------------------------------------------ config

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (and, via sbatch's --export=ALL, for jobs)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a test run inside a Slurm job must not leak its job's settings
                del env[var]
        env["PATH"] = with_sbin(env.get("PATH", os.defpath))  # the daemons are started by name
        return env

    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        ports = {"n1": self.port_n1, "n2": self.port_n2}
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr={addr} Port={ports[n]} CPUs={CPUS_PER_NODE} "
            f"RealMemory=2000 State=UNKNOWN" for n, addr in NODES.items())
        r = self.root
        self.conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName={self.name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/log/slurmctld.pid
SlurmdPidFile={r}/log/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmdDebug=info
SlurmctldDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
GresTypes=gpu
# Keep finished jobs queryable by `scontrol show job` for the whole test session
# (there is no accounting database, so sacct cannot answer).
MinJobAge=3600
# Give a signalled/cancelled job time to save before SIGKILL, as on a real cluster.
KillWait={KILL_WAIT_SECONDS}
SlurmdTimeout=30
InactiveLimit=0
# Start a requeued job as soon as it is eligible rather than at the next periodic pass.
SchedulerParameters=sched_interval=2,bf_interval=2
# Power saving makes State=CLOUD nodes legal; they are never resumed (the program fails).
SuspendProgram=/bin/true
ResumeProgram=/bin/false
SuspendTime=INFINITE
{nodes}
NodeName=g[01-0{GPU_NODES}] NodeAddr=127.0.9.1 CPUs=96 RealMemory=1000000 Gres=gpu:{GPUS_PER_GPU_NODE} State=CLOUD
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
PartitionName={GPU_PARTITION} Nodes=g[01-0{GPU_NODES}] MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(f"NodeName=g[01-0{GPU_NODES}] Name=gpu Count={GPUS_PER_GPU_NODE}\n")

    # ------------------------------------------------------------ daemons

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True,  # a Ctrl-C in pytest must not reach them first
                                            preexec_fn=_die_with_parent)
        log.close()

    def start(self, timeout_seconds: float = HANG_GUARD_SECONDS) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        self.write_config()
        munge = self.root / "munge"
        os.chmod(self.root, 0o755)  # munged wants every folder above its socket searchable
        key = munge / "key"
        key.write_bytes(os.urandom(1024))  # this cluster's own key: no shared /etc/munge needed
        os.chmod(key, 0o400)
        self._start("munged", ["/usr/sbin/munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"])
        self._wait(lambda: self.munge_socket.exists(), timeout_seconds, "munged did not create its socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self.nodes_idle, timeout_seconds, "nodes n1 and n2 did not become idle")
        return self

    def _wait(self, ready, timeout_seconds: float, what: str) -> None:
        deadline = time.time() + timeout_seconds
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout_seconds:.0f} s"
                raise RuntimeError(f"Slurm test cluster in {self.root}: {what} ({why}).\n{self.logs()}")
            time.sleep(0.2)

    def nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-p", "debug", "-N", "-o", "%N %T"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def logs(self, tail_chars: int = 3000) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + sorted((self.root / "log").glob("*.out")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail_chars:]}")
        return "\n".join(parts)

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """Cancel this cluster's jobs (their processes belong to slurmstepd, which outlives
        slurmd), then SIGTERM each daemon we started (slurmd first, munged last), SIGKILL stragglers."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                # SLURM_CONF in self.env points at our slurmctld: only this cluster's jobs are touched.
                self.run(["scancel", "--full", "--signal=KILL", f"--user={os.getuid()}"], check=False, timeout=10)
                self.run(["scancel", f"--user={os.getuid()}"], check=False, timeout=10)
                deadline = time.time() + 10
                while time.time() < deadline and self.run(["squeue", "-h"], check=False, timeout=10).stdout.strip():
                    time.sleep(0.2)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.time() + timeout_seconds
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()

    # ------------------------------------------------------------ clients

    def run(self, argv: list[str], check: bool = True, timeout: float = HANG_GUARD_SECONDS,
            **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (text output)."""
        return subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)

    def sbatch(self, args: list[str], **kwargs) -> int:
        """Submit; returns the job id (`--parsable` prints `id[;cluster]`)."""
        out = self.run(["sbatch", "--parsable", *args], **kwargs).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (the first record; an array's first task)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.splitlines()[0]
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out))

    def wait_job(self, job_id: int | str, timeout_seconds: float = HANG_GUARD_SECONDS,
                 states: set[str] = TERMINAL_STATES, poll_seconds: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of `states`; TimeoutError shows its last record and the logs."""
        deadline = time.time() + timeout_seconds
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_seconds} s: {info}\n"
                                   f"{self.logs()}")
            time.sleep(poll_seconds)


def start_cluster() -> SlurmCluster:
    """A started cluster; raise with the install hint if Slurm is missing."""
    return SlurmCluster().start()


try:  # the pytest fixture; the module also works without pytest (`python -m tests.slurm_cluster`)
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A started two-node cluster for the whole session. Fails (never skips) without Slurm."""
        missing = missing_binaries()
        if missing:
            pytest.fail(f"{INSTALL_HINT} (missing: {', '.join(missing)})", pytrace=False)
        cluster = SlurmCluster()
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)  # failures above already quoted its logs
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill <pid>` also stops the daemons cleanly
    cluster = start_cluster()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster; logs in {cluster.root}/log", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
