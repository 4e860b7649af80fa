"""Which scheduler started this process, and the layout of the job it gives: ``ember train``
under SLURM, a Kubeflow PyTorchJob or ``mpirun`` needs no torchrun command line.

Two shapes of job. *Agents*: the scheduler starts one ``ember`` per node (SLURM
``--ntasks-per-node=1``, a PyTorchJob with ``nprocPerNode``), and ember starts torch's
elastic agent there with ``nproc_per_node`` workers, the nodes meeting through a c10d
rendezvous at the first node. *Direct*: the scheduler starts every rank itself (SLURM one
task per GPU, ``mpirun -np N``, a PyTorchJob without ``nprocPerNode``), and this process
becomes one rank: its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` are
set from the scheduler's variables. A process torchrun started (torchx's ``dist.ddp``
among them) is left alone, and ``EMBER_NO_CLUSTER=1`` turns detection off.

Everything here reads a mapping of environment variables, so tests pass fake ones.

Example::

    job = detect_cluster({"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
                          "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu[01-02]"})
    job.describe()  # 'slurm job 4242: 2 nodes x 4 processes; rendezvous at gpu01:24242, this is node 1'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ember.errors import EmberError

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


def _scheduler_job(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    if env.get(NO_CLUSTER_ENV, "") not in ("", "0") or "TORCHELASTIC_RUN_ID" in env:
        return None
    for detect in (_slurm, _kubeflow, _mpi):
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
    port = _int(env, "MASTER_PORT", 20000 + _digits(job_id) % 20000)  # one per job: two jobs on a node differ
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


# --------------------------------------------------------------------------- Kubeflow, MPI


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


MPI_VARIABLES = {  # rank, size, local rank, local size
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def _mpi(env: Mapping[str, str], local_gpus: Callable[[], int]) -> ClusterJob | None:
    """``mpirun -np N ember train ...``: every rank started by MPI (direct). MPI names no address to
    meet at: MASTER_ADDR, else localhost when every rank runs on this node."""
    for name, (rank_key, size_key, local_key, local_size_key) in MPI_VARIABLES.items():
        if rank_key not in env or size_key not in env:
            continue
        world, local_size = _int(env, size_key, 1), _int(env, local_size_key, 0)
        master = env.get("MASTER_ADDR") or ("localhost" if local_size == world else "")
        if not master and world > 1:
            raise EmberError(
                f"ember was started by {name} on several nodes ({world} ranks, {local_size} on this one) and MPI "
                f"does not say where rank 0 runs. Pass its host name: mpirun -x MASTER_ADDR=<first host> "
                f"(and optionally -x MASTER_PORT), or set {NO_CLUSTER_ENV}=1 to train on this node alone."
            )
        port = _int(env, "MASTER_PORT", DEFAULT_PORT)
        rank_env = {"RANK": env[rank_key], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get(local_key, "0")}
        rank_env |= {"MASTER_ADDR": master, "MASTER_PORT": str(port)}
        nnodes = max(1, world // local_size) if local_size else 1
        return ClusterJob(name, nnodes, 0, local_size or world, master, port, "", rank_env)
    return None


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
        raise EmberError(f"The environment variable {key}={value!r} is not a number. Fix it or unset it.")
    return int(match.group(1))


def _digits(text: str) -> int:
    digits = "".join(ch for ch in text if ch.isdigit())
    return int(digits) if digits else 0
