"""Which scheduler started this process, and the layout of the job it gives: ``ember train``
under SLURM, IBM LSF, PBS Pro / Torque, a Kubeflow PyTorchJob or ``mpirun`` needs no
torchrun command line.

Two shapes of job. *Agents*: the scheduler starts one ``ember`` per node (SLURM
``--ntasks-per-node=1``, LSF ``blaunch`` with one slot per host, PBS ``pbsdsh -u``, a
PyTorchJob with ``nprocPerNode``, or the job script of a one-node LSF or PBS job), and
ember starts torch's elastic agent there with ``nproc_per_node`` workers, the nodes meeting
through a c10d rendezvous at the first node. *Direct*: the scheduler starts every rank
itself (SLURM one task per GPU, LSF ``jsrun``, ``mpirun -np N``, a PyTorchJob without
``nprocPerNode``), and this process becomes one rank: its ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` are set from the scheduler's variables. A process
torchrun started (torchx's ``dist.ddp`` among them) is left alone, and ``EMBER_NO_CLUSTER=1``
turns detection off. ``announce`` says what was found, in one line through ``logging``.

Everything here reads a mapping of environment variables, so tests pass fake ones.

Example::

    job = detect_cluster({"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
                          "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu[01-02]"})
    job.describe()  # 'slurm job 4242: 2 nodes x 4 processes; rendezvous at gpu01:24242, this is node 1'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import EmberError

logger = logging.getLogger(__name__)

NO_CLUSTER_ENV = "EMBER_NO_CLUSTER"  # set to 1: ignore the scheduler's variables
DEFAULT_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class ClusterJob:
    """The layout a scheduler gave this job. ``rank_env`` is set for a direct job (this process
    is one rank); an agents job starts ``nproc_per_node`` workers on each of ``nnodes`` nodes."""

    scheduler: str
    nnodes: int
    node_rank: int | None  # None: the rendezvous numbers the nodes (Kubeflow's elasticPolicy)
    nproc_per_node: int
    master_addr: str
    master_port: int
    run_id: str
    rank_env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return int(self.rank_env["WORLD_SIZE"]) if self.rank_env else self.nnodes * self.nproc_per_node

    @property
    def agents(self) -> bool:
        """Whether ember must start the workers (else this process is a rank already)."""
        return not self.rank_env

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        """One line: the scheduler, the layout and where the ranks meet."""
        job = f"{self.scheduler} job {self.run_id}" if self.run_id else self.scheduler
        if self.agents:
            shape = f"{_count(self.nnodes, 'node')} x {_count(self.nproc_per_node, 'process', 'processes')}"
            node = "this node's rank set there" if self.node_rank is None else f"this is node {self.node_rank}"
            return f"{job}: {shape}; rendezvous at {self.endpoint}, {node}"
        env = self.rank_env
        return (
            f"{job}: rank {env['RANK']} of {env['WORLD_SIZE']} started by the scheduler (local rank "
            f"{env['LOCAL_RANK']}); process group at {self.endpoint}"
        )


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def detect_cluster(env: Mapping[str, str], local_gpus: Callable[[], int] = lambda: 0) -> ClusterJob | None:
    """The job ``env`` describes, or None: no scheduler, a single process, a torchrun worker, or
    detection turned off. ``local_gpus``: GPUs on this node when the scheduler does not say."""
    job = _scheduler_job(env, local_gpus)
    return job if job is not None and job.world_size > 1 else None


def single_process_job(env: Mapping[str, str], local_gpus: Callable[[], int] = lambda: 0) -> ClusterJob | None:
    """The scheduler's job when it is this one process (nothing to lay out, but worth a line), else None."""
    job = _scheduler_job(env, local_gpus)
    return job if job is not None and job.world_size == 1 else None


def announce(job: ClusterJob, single: bool = False) -> None:
    """Say in one line what was found (shown at the default verbosity, as ember's other progress
    lines): once per node (a direct job's local rank 0 says it); ``single``: a job of one process."""
    if single:
        name = f"{job.scheduler} job {job.run_id}" if job.run_id else job.scheduler
        logger.info("ember: %s: 1 process, nothing to lay out; training here (--nproc N starts N)", name)
    elif job.agents or job.rank_env["LOCAL_RANK"] == "0":
        logger.info("ember: %s", job.describe())


def _scheduler_job(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    if env.get(NO_CLUSTER_ENV, "") not in ("", "0") or "TORCHELASTIC_RUN_ID" in env:
        return None
    # The schedulers before bare MPI: under LSF or PBS an mpirun rank learns where rank 0 runs from the job's hosts.
    for detect in (_slurm, _lsf, _pbs, _kubeflow, _mpi):
        job = detect(env, local_gpus)
        if job is not None:
            return job
    return None


# --------------------------------------------------------------------------- SLURM


def _slurm(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    if "SLURM_JOB_ID" not in env or not ("SLURM_NTASKS" in env or "SLURM_NPROCS" in env):
        return None  # not inside a job step (a login shell, or an allocation's own shell)
    job_id = env["SLURM_JOB_ID"]
    nnodes = _int(env, "SLURM_NNODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
    ntasks = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    master = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "localhost")
    port = _job_port(env, job_id)
    common = dict(scheduler="slurm", nnodes=nnodes, master_addr=master, master_port=port, run_id=job_id)
    if ntasks > nnodes:  # one task per GPU: srun started every rank
        rank_env = {
            "RANK": str(_int(env, "SLURM_PROCID", 0)),
            "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": str(_int(env, "SLURM_LOCALID", 0)),
            "MASTER_ADDR": master,
            "MASTER_PORT": str(port),
        }
        per_node = _int(env, "SLURM_NTASKS_PER_NODE", max(1, ntasks // nnodes))
        return ClusterJob(**common, node_rank=_int(env, "SLURM_NODEID", 0), nproc_per_node=per_node, rank_env=rank_env)
    if ntasks < nnodes:
        raise EmberError(
            f"SLURM job {job_id} runs {ntasks} task(s) on {nnodes} nodes: ember needs one task per node (it starts "
            f"the node's processes) or one per GPU. Use `srun --ntasks-per-node=1 ember train ...` (see "
            f"examples/slurm/train.sbatch), or set {NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    gpus = _slurm_gpus(env) or local_gpus() or 1
    return ClusterJob(**common, node_rank=_int(env, "SLURM_NODEID", 0), nproc_per_node=gpus)


def _slurm_gpus(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("4", "a100:4"); 0 if neither."""
    if "SLURM_GPUS_ON_NODE" in env:
        return _int(env, "SLURM_GPUS_ON_NODE", 0)
    match = re.search(r"(\d+)\s*$", env.get("SLURM_GPUS_PER_NODE", ""))
    return int(match.group(1)) if match else 0


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list as host names, in order, without ``scontrol``:
    ``a[1-3,5],b7`` → a1 a2 a3 a5 b7; ``gpu[01-02]`` keeps the zero padding; ``r[1-2]n[1-2]`` → r1n1 r1n2 r2n1 r2n2."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts += _expand_one(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_one(item: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_one(rest) if rest else [""]
    out = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or high and not high.isdigit():
            raise EmberError(f"SLURM host list {item!r} has a range ember cannot read ({part!r}). Set MASTER_ADDR.")
        for n in range(int(low), int(high or low) + 1):
            out += [f"{prefix}{n:0{len(low)}d}{tail}" for tail in tails]
    return out


# --------------------------------------------------------------------------- Kubeflow, MPI, jsrun


def _kubeflow(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    """A PyTorchJob (or Trainer TrainJob): torchrun's ``PET_*`` variables with ``nprocPerNode``
    (agents), else the operator's MASTER_ADDR/WORLD_SIZE/RANK, one process per pod (direct)."""
    run_id = env.get("PET_RDZV_ID") or env.get("PYTORCHJOB_NAME") or env.get("HOSTNAME", "").rsplit("-", 2)[0]
    if "PET_NNODES" in env:
        per_node = env.get("PET_NPROC_PER_NODE", "auto")
        nproc = int(per_node) if per_node.isdigit() else local_gpus() or 1  # auto, gpu, cpu
        host, _, port = env.get("PET_RDZV_ENDPOINT", "").rpartition(":")  # elasticPolicy's
        rank = env.get("PET_NODE_RANK") or env.get("RANK")  # none with elasticPolicy: the rendezvous picks
        return ClusterJob(
            scheduler="kubeflow",
            nnodes=_nodes(env["PET_NNODES"]),
            node_rank=int(rank) if rank and rank.isdigit() else None,
            nproc_per_node=nproc,
            master_addr=host or env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR", "localhost"),
            master_port=int(port) if port.isdigit() else _int(env, "PET_MASTER_PORT", _int(env, "MASTER_PORT", 23456)),
            run_id=run_id,
        )
    if "KUBERNETES_SERVICE_HOST" not in env or not {"MASTER_ADDR", "WORLD_SIZE", "RANK"} <= env.keys():
        return None
    if "LOCAL_RANK" in env:
        return None  # a launcher of the user's own started this rank
    world, rank = _int(env, "WORLD_SIZE", 1), _int(env, "RANK", 0)
    rank_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"}
    rank_env |= {"MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": str(_int(env, "MASTER_PORT", 23456))}
    port = int(rank_env["MASTER_PORT"])
    return ClusterJob("kubeflow", world, rank, 1, env["MASTER_ADDR"], port, run_id, rank_env)


LAUNCHER_VARIABLES = {  # rank, size, local rank, local size
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # IBM's Job Step Manager (LSF on CSM systems: Summit, Sierra)
    "jsrun": ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_LOCAL_SIZE"),
}


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks a launcher started (``local_size`` 0: it does not say)."""

    launcher: str
    rank: int
    world: int
    local_rank: int
    local_size: int


def _launched_ranks(env: Mapping[str, str]) -> Ranks | None:
    """The rank an MPI launcher or jsrun gave this process, or None; a rank outside its size is refused."""
    for name, (rank_key, size_key, local_key, local_size_key) in LAUNCHER_VARIABLES.items():
        if rank_key not in env or size_key not in env:
            continue
        ranks = Ranks(
            name, _int(env, rank_key, 0), _int(env, size_key, 1), _int(env, local_key, 0), _int(env, local_size_key, 0)
        )
        if ranks.rank >= ranks.world or (ranks.local_size and ranks.local_rank >= ranks.local_size):
            raise EmberError(
                f"{name} says this is rank {env[rank_key]} of {env[size_key]} ({rank_key}, {size_key}; local rank "
                f"{env.get(local_key, '0')} of {env.get(local_size_key) or '?'}): a rank must be below the size, so "
                f"these variables were set by hand or left over from another job. Unset them, or set "
                f"{NO_CLUSTER_ENV}=1 to train here alone."
            )
        return ranks
    return None


def _rank_job(scheduler: str, run_id: str, ranks: Ranks, master: str, port: int) -> ClusterJob:
    """A direct job: this process is rank ``ranks.rank``, its process group at ``master:port``."""
    rank_env = {"RANK": str(ranks.rank), "WORLD_SIZE": str(ranks.world), "LOCAL_RANK": str(ranks.local_rank)}
    rank_env |= {"MASTER_ADDR": master, "MASTER_PORT": str(port)}
    nnodes = max(1, ranks.world // ranks.local_size) if ranks.local_size else 1
    return ClusterJob(scheduler, nnodes, 0, ranks.local_size or ranks.world, master, port, run_id, rank_env)


def _mpi(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    """``mpirun -np N ember train ...`` outside a scheduler ember knows: every rank started by MPI
    (direct). MPI names no address to meet at: MASTER_ADDR, else localhost when every rank runs on
    this node."""
    ranks = _launched_ranks(env)
    if ranks is None:
        return None
    master = env.get("MASTER_ADDR") or ("localhost" if ranks.local_size == ranks.world else "")
    if not master and ranks.world > 1:
        raise EmberError(
            f"ember was started by {ranks.launcher} on several nodes ({ranks.world} ranks, {ranks.local_size} on "
            f"this one) and MPI does not say where rank 0 runs. Pass its host name: mpirun -x MASTER_ADDR=<first "
            f"host> (and optionally -x MASTER_PORT), or set {NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    return _rank_job(ranks.launcher, "", ranks, master, _int(env, "MASTER_PORT", DEFAULT_PORT))


def _rank_zero_host(env: Mapping[str, str], ranks: Ranks, hosts: Callable[[], list[str]], source: str) -> str:
    """Where a scheduler's ranks meet: MASTER_ADDR, else localhost when every rank is on this node,
    else the job's first host (where the launchers put rank 0: they fill the hosts in order)."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if ranks.local_size == ranks.world:
        return "localhost"
    first = hosts()
    if not first:
        raise EmberError(
            f"ember was started by {ranks.launcher} as rank {ranks.rank} of {ranks.world}, and {source} does not "
            f"name the job's hosts. Pass rank 0's host name in MASTER_ADDR, or set {NO_CLUSTER_ENV}=1 to train "
            f"here alone."
        )
    return first[0]


# --------------------------------------------------------------------------- LSF


def _lsf(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    """An IBM LSF job (``LSB_JOBID``). Direct: ranks ``jsrun`` or an MPI started. Agents: one
    ``blaunch`` task per host (``LSF_PM_TASKID``, 1-based, is the node), or the job script of a
    one-host job. The hosts and their slots: ``LSB_MCPU_HOSTS``, else ``LSB_HOSTS``."""
    if "LSB_JOBID" not in env:
        return None
    index = env.get("LSB_JOBINDEX", "0")  # the elements of a job array share LSB_JOBID
    job_id = env["LSB_JOBID"] + (f"[{index}]" if index not in ("", "0") else "")
    hosts, port = _lsf_hosts(env), _job_port(env, job_id)
    ranks = _launched_ranks(env)
    if ranks is not None:
        names = list(hosts)
        if ranks.launcher == "jsrun" and len(names) > 1:
            names = names[1:]  # on jsrun's systems the launch node leads the list ("batch2 1 h22n07 42 ..."), no rank
        master = _rank_zero_host(env, ranks, lambda: names, "LSB_MCPU_HOSTS (or LSB_HOSTS)")
        return _rank_job("lsf", job_id, ranks, master, port)
    if "LSF_PM_TASKID" in env:
        task = _int(env, "LSF_PM_TASKID", 1)
        if any(slots > 1 for slots in hosts.values()) or not 1 <= task <= len(hosts):
            raise EmberError(
                f"LSF job {job_id}: blaunch started this ember as task {task} of a job with "
                f"{_count(sum(hosts.values()), 'slot')} on {_count(len(hosts), 'host')} ({_lsf_source(env)}); ember "
                f"needs one task per host (it starts the host's processes). Submit one slot per host: bsub -n "
                f"<hosts> -R 'span[ptile=1]' -gpu 'num=<GPUs per host>' ... blaunch ember train ...; or start one "
                f"rank per GPU with jsrun or mpirun; or set {NO_CLUSTER_ENV}=1 to train on this host alone."
            )
        nnodes, node_rank = len(hosts), task - 1
    elif len(hosts) > 1:
        raise EmberError(
            f"LSF job {job_id} spans {_count(len(hosts), 'host')} ({', '.join(hosts)}), but this ember is its job "
            f"script, on one of them. Start one ember per host: bsub -R 'span[ptile=1]' ... blaunch ember train "
            f"... (or one rank per GPU with jsrun or mpirun), or set {NO_CLUSTER_ENV}=1 to train on this host alone."
        )
    else:
        nnodes, node_rank = 1, 0
    master = env.get("MASTER_ADDR") or next(iter(hosts), "localhost")
    return ClusterJob("lsf", nnodes, node_rank, local_gpus() or 1, master, port, job_id)


def _lsf_hosts(env: Mapping[str, str]) -> dict[str, int]:
    """Slots per host, in LSF's order: ``LSB_MCPU_HOSTS`` ("hostA 4 hostB 4"), else ``LSB_HOSTS``
    (a name per slot: "hostA hostA hostA hostA hostB ..."); empty when LSF says neither."""
    text = env.get("LSB_MCPU_HOSTS", "").strip()
    if not text:
        return _slots_per_host((host, 1) for host in env.get("LSB_HOSTS", "").split())
    words = text.split()
    if len(words) % 2 or not all(word.isdigit() and int(word) > 0 for word in words[1::2]):
        raise EmberError(
            f"LSB_MCPU_HOSTS={text!r} is not LSF's list of hosts and their slots ('hostA 4 hostB 4'), so ember "
            f"cannot tell where the job runs. Unset it (ember then reads LSB_HOSTS), or set {NO_CLUSTER_ENV}=1 to "
            f"train on this host alone."
        )
    return _slots_per_host(zip(words[::2], map(int, words[1::2])))


def _lsf_source(env: Mapping[str, str]) -> str:
    return "LSB_MCPU_HOSTS" if env.get("LSB_MCPU_HOSTS", "").strip() else "LSB_HOSTS"


# --------------------------------------------------------------------------- PBS Pro, Torque


def _pbs(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    """A PBS Pro or Torque job (``PBS_JOBID``). Direct: ranks an MPI started (``mpiexec``; PBS's own
    ``PBS_TASKNUM`` is a task id, not a rank). Agents: one ember per node (``pbsdsh -u``, the node
    ``PBS_NODENUM``), or the job script of a one-node job. The hosts: ``PBS_NODEFILE``, a line per slot."""
    if "PBS_JOBID" not in env:
        return None
    job_id = env["PBS_JOBID"]
    port = _job_port(env, job_id)
    ranks = _launched_ranks(env)
    if ranks is not None:  # the node file is read only when needed: PBS keeps it on the job's first node
        master = _rank_zero_host(env, ranks, lambda: list(_pbs_hosts(env)), "PBS_NODEFILE")
        return _rank_job("pbs", job_id, ranks, master, port)
    nnodes = _int(env, "PBS_NUM_NODES", 0) or len(_pbs_hosts(env)) or 1  # PBS_NUM_NODES: Torque's
    node_rank = _int(env, "PBS_NODENUM", 0)
    if nnodes > 1 and node_rank == 0 and env.get("PBS_TASKNUM") == "1":  # task 1: the job script's own shell
        raise EmberError(
            f"PBS job {job_id} spans {nnodes} nodes, but this ember is its job script, on the first of them. "
            f"Start one ember per node: pbsdsh -u <a script that runs ember train ...> (pbsdsh passes a bare "
            f"environment), or one rank per GPU with mpiexec; or set {NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    if node_rank >= nnodes:
        raise EmberError(
            f"PBS job {job_id}: PBS_NODENUM={node_rank}, but the job has {_count(nnodes, 'node')} (PBS_NODEFILE, "
            f"PBS_NUM_NODES), so its layout cannot be read. Unset the variable set by hand, or set "
            f"{NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    master = env.get("MASTER_ADDR") or next(iter(_pbs_hosts(env)), "" if nnodes > 1 else "localhost")
    if not master:
        raise EmberError(
            f"PBS job {job_id} spans {nnodes} nodes and PBS_NODEFILE is not set here, so ember cannot tell where "
            f"node 0 runs. Pass its host name in MASTER_ADDR, or set {NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    return ClusterJob("pbs", nnodes, node_rank, local_gpus() or 1, master, port, job_id)


def _pbs_hosts(env: Mapping[str, str]) -> dict[str, int]:
    """Slots per host from ``PBS_NODEFILE`` (a host name per line, a line per slot, the job's first
    host first); empty when the variable is not set."""
    name = env.get("PBS_NODEFILE", "")
    if not name:
        return {}
    try:
        text = Path(name).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise EmberError(
            f"PBS_NODEFILE={name} cannot be read on this host ({err.strerror or type(err).__name__}). PBS keeps "
            f"the node file on the job's first node: give the processes elsewhere MASTER_ADDR=<first host> (and, "
            f"for one ember per node, PBS_NUM_NODES=<nodes>), or set {NO_CLUSTER_ENV}=1 to train here alone."
        ) from None
    names = [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise EmberError(
            f"PBS_NODEFILE={name} lists no host, so ember cannot tell where the job runs. Check the job's "
            f"resource request (-l select=...), or set {NO_CLUSTER_ENV}=1 to train on this node alone."
        )
    return _slots_per_host((host, 1) for host in names)


def _slots_per_host(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """(host, slots) pairs, a host perhaps several times (``a 1, a 1, b 1``), as slots per host in order of
    first appearance (``{a: 2, b: 1}``)."""
    slots: dict[str, int] = {}
    for host, count in counts:
        slots[host] = slots.get(host, 0) + count
    return slots


# --------------------------------------------------------------------------- reading the variables


def _nodes(text: str) -> int:
    """PET_NNODES: "2", or an elastic range "2:2"; a range that may change size is refused."""
    low, _, high = text.partition(":")
    if not low.isdigit() or high and high != low:
        raise EmberError(
            f"PET_NNODES={text!r}: ember's jobs keep their size (a resume may change it, a running job not). "
            f"Set elasticPolicy minReplicas equal to maxReplicas, or leave elasticPolicy out."
        )
    return int(low)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    match = re.match(r"\s*(\d+)", value)  # SLURM writes some counts as "4(x2)"
    if not value:
        return default
    if match is None:
        raise EmberError(
            f"The environment variable {key}={value!r} is not a number, so ember cannot read the job's layout. Fix "
            f"it or unset it, or set {NO_CLUSTER_ENV}=1 to ignore the scheduler's variables and train here alone."
        )
    return int(match.group(1))


def _digits(text: str) -> int:
    digits = "".join(ch for ch in text if ch.isdigit())
    return int(digits) if digits else 0


def _job_port(env: Mapping[str, str], job_id: str) -> int:
    """MASTER_PORT, else one drawn from the job id (its number before any ``.server``): two jobs sharing
    a node meet on different ports, and every node of a job computes the same one."""
    return _int(env, "MASTER_PORT", 20000 + _digits(job_id.split(".")[0]) % 20000)
