"""A throwaway SLURM cluster on this machine, for tests: its own munged (own socket), one
slurmctld and one slurmd per simulated node, all on free ports, every file in one folder,
every daemon a child process we started and stop by pid (also when the test fails).

    with SlurmCluster(tmp_path / "slurm", nodes=2) as cluster:
        job = cluster.sbatch(["launch/slurm.sbatch"], env=...)
        info = cluster.wait(job, timeout=180)   # {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}

Needs root (slurmd runs jobs as the submitting user and munged runs as `munge`) and the
Debian packages slurmctld, slurmd, slurm-client, munge (see `missing()`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing() -> str:
    """Why a cluster cannot come up here ('' when it can)."""
    absent = [
        d
        for d in DAEMONS
        if not shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ]
    if absent:
        return (
            f"SLURM/munge not installed (missing {', '.join(absent)}); as root: apt-get "
            f"install -y --no-install-recommends slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "a throwaway SLURM cluster needs root (munged runs as 'munge', slurmd as root)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (the munge package creates it)"
    return ""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class SlurmCluster:
    def __init__(self, lab: Path, nodes: int = 1, cpus_per_node: int = 1):
        self.lab = Path(lab)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.lab / "slurm.conf"
        # munged runs as `munge`, which cannot enter pytest's private (0700) temp folders.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------ life-cycle

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        for sub in ("state/ctld", "run", "log", *(f"state/slurmd-{n}" for n in self.nodes)):
            (self.lab / sub).mkdir(parents=True, exist_ok=True)
        self.lab.chmod(0o755)
        munge_dir = self.munge_dir
        munge_dir.chmod(0o755)
        shutil.chown(munge_dir, "munge", "munge")
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            user="munge",
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ports[0], ports[1:]), encoding="utf-8")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait_for(lambda: _listening(ports[0]), timeout, "slurmctld's port")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node])
        self._wait_for(self._all_idle, timeout, "all nodes idle (sinfo)")

    def stop(self) -> None:
        """Stop every daemon we started, by pid: TERM, then KILL after a grace period."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.lab / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 (child keeps it)
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)  # one that dies at start-up fails the next _wait_for

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} died ({proc.returncode}) while "
                        f"waiting for {what}:\n{self.logs()}"
                    )
            time.sleep(0.3)
        raise TimeoutError(f"SLURM: no {what} after {timeout:.0f} s:\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        lab = self.lab
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        return f"""\
ClusterName=throwaway
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={lab}/state/ctld
SlurmdSpoolDir={lab}/state/slurmd-%n
SlurmctldPidFile={lab}/run/slurmctld.pid
SlurmdPidFile={lab}/run/slurmd-%n.pid
SlurmctldLogFile={lab}/log/slurmctld.log
SlurmdLogFile={lab}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    # ------------------------------------------------------------ jobs

    def run(
        self, cmd: list[str], check: bool = True, timeout: float = 30, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [_which(cmd[0]), *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            [_which("sbatch"), "--parsable", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd,
            env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = 180, until=None) -> dict:
        """Poll until the job left the queue (or `until(job_info)` holds); scontrol still
        knows it (MinJobAge) and gives its final state and exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None:
                info = self.job(job_id)
                if until(info):
                    return info
            elif not self.run(["squeue", "-h", "-j", job_id], check=False).stdout.strip():
                return self.job(job_id)
            time.sleep(0.5)
        info = self.job(job_id)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(
            f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
            f"(reason {info.get('Reason')}):\n{self.logs()}"
        )

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.lab / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)
