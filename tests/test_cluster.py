"""``ember train`` under a scheduler: the layout read from SLURM's, LSF's, PBS's, Kubeflow's and MPI's
variables (fake environments, a fake PBS node file), the command line's use of it (the launcher faked),
and, slow, real jobs on this machine: two SLURM "nodes" whose agents meet, and two SLURM tasks that
are the ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe
from ember.cli import main
from ember.errors import EmberError
from ember.training import launcher
from ember.training.cluster import ClusterJob, detect_cluster, expand_hostlist, single_process_job

SLURM_PER_NODE = {  # sbatch --nodes=2 --gpus-per-node=4; srun --ntasks-per-node=1 ember train ...
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "1",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}
SLURM_PER_GPU = {  # srun --nodes=2 --ntasks-per-node=4 ember train ...
    "SLURM_JOB_ID": "99",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4(x2)",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "a[3-4]",
    "SLURM_JOB_NODELIST": "a[1-4]",
}


@pytest.mark.parametrize(
    "text,hosts",
    [
        ("a[1-3,5],b7", ["a1", "a2", "a3", "a5", "b7"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node-[8-10]-ib", ["node-8-ib", "node-9-ib", "node-10-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("localhost", ["localhost"]),
        ("x1, x2", ["x1", "x2"]),
        ("c[009-011]", ["c009", "c010", "c011"]),
    ],
)
def test_slurm_host_lists_expand_without_scontrol(text, hosts):
    assert expand_hostlist(text) == hosts


def test_a_host_list_ember_cannot_read_says_to_set_master_addr():
    with pytest.raises(EmberError, match="MASTER_ADDR"):
        expand_hostlist("a[x-2]")


def test_slurm_one_task_per_node_starts_an_agent_per_node_at_the_first_node():
    job = detect_cluster(SLURM_PER_NODE)
    assert job == ClusterJob("slurm", 2, 1, 4, "gpu07", 24242, "4242")
    assert job.agents and job.world_size == 8
    assert job.describe() == "slurm job 4242: 2 nodes x 4 processes; rendezvous at gpu07:24242, this is node 1"
    assert detect_cluster({**SLURM_PER_NODE, "MASTER_PORT": "31000", "MASTER_ADDR": "head"}).endpoint == "head:31000"


@pytest.mark.parametrize(
    "gpu_vars,local,nproc",
    [
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, 8, 2),
        ({"SLURM_GPUS_PER_NODE": "3"}, 8, 3),
        ({}, 8, 8),  # the scheduler does not say: the GPUs this node's torch sees
        ({}, 0, 1),  # a CPU node: one process per node
    ],
)
def test_slurm_processes_per_node_come_from_its_gpus(gpu_vars, local, nproc):
    env = {k: v for k, v in SLURM_PER_NODE.items() if k != "SLURM_GPUS_ON_NODE"} | gpu_vars
    assert detect_cluster(env, lambda: local).nproc_per_node == nproc


def test_slurm_one_task_per_gpu_makes_this_process_the_rank():
    job = detect_cluster(SLURM_PER_GPU)
    assert not job.agents and job.world_size == 8 and job.nproc_per_node == 4
    assert job.rank_env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "a3",
        "MASTER_PORT": "20099",
    }
    assert job.describe() == (
        "slurm job 99: rank 5 of 8 started by the scheduler (local rank 1); process group at a3:20099"
    )


def test_slurm_with_fewer_tasks_than_nodes_is_refused_with_the_fix():
    with pytest.raises(EmberError, match="--ntasks-per-node=1"):
        detect_cluster({**SLURM_PER_NODE, "SLURM_NNODES": "4"})


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SLURM_JOB_ID": "5", "SLURM_NNODES": "1", "SLURM_NTASKS": "1"},  # one process: nothing to lay out
        {"SLURM_JOB_ID": "5", "SLURM_NNODES": "2"},  # salloc's shell, not a job step
        {**SLURM_PER_NODE, "EMBER_NO_CLUSTER": "1"},
        {**SLURM_PER_NODE, "TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "8"},  # a worker ember started
        {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"},  # torchrun's or the user's own: already set
    ],
)
def test_no_job_to_lay_out(env):
    assert detect_cluster(env, lambda: 0) is None


def test_a_pytorchjob_with_nproc_per_node_starts_an_agent_per_pod():
    env = {  # what training-operator v1.7+ sets in worker pod 0 of a job with a master, a worker, nprocPerNode 4
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "HOSTNAME": "train-worker-0",
        "MASTER_ADDR": "train-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "8",
        "RANK": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_NNODES": "2",
    }
    assert detect_cluster(env) == ClusterJob("kubeflow", 2, 1, 4, "train-master-0", 23456, "train")
    assert detect_cluster({**env, "PET_NPROC_PER_NODE": "auto"}, lambda: 2).nproc_per_node == 2


def test_a_pytorchjob_with_an_elastic_policy_meets_at_its_rendezvous_endpoint():
    env = {
        "PET_NNODES": "3:3",
        "PET_NPROC_PER_NODE": "2",
        "PET_RDZV_ENDPOINT": "train-worker-0:29400",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ID": "train",
    }
    job = detect_cluster(env)
    assert job == ClusterJob("kubeflow", 3, None, 2, "train-worker-0", 29400, "train")
    assert job.describe().endswith("rendezvous at train-worker-0:29400, this node's rank set there")
    with pytest.raises(EmberError, match="minReplicas equal to maxReplicas"):
        detect_cluster({**env, "PET_NNODES": "2:4"})


def test_a_pytorchjob_without_nproc_per_node_runs_one_rank_per_pod():
    env = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "MASTER_ADDR": "train-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "3",
        "RANK": "2",
        "HOSTNAME": "train-worker-1",
    }
    job = detect_cluster(env)
    assert job.scheduler == "kubeflow" and job.run_id == "train" and job.world_size == 3
    assert job.rank_env == {
        "RANK": "2",
        "WORLD_SIZE": "3",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "train-master-0",
        "MASTER_PORT": "23456",
    }
    assert detect_cluster({**env, "LOCAL_RANK": "0"}) is None  # the user's own launcher set the rank


def test_mpirun_on_one_node_meets_at_localhost_and_on_several_needs_master_addr():
    one_node = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    job = detect_cluster(one_node)
    assert job.scheduler == "openmpi" and job.rank_env == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "29500",
    }
    two_nodes = {**one_node, "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(EmberError, match="mpirun -x MASTER_ADDR"):
        detect_cluster(two_nodes)
    assert detect_cluster({**two_nodes, "MASTER_ADDR": "n1"}).nnodes == 2
    mpich = detect_cluster({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0"})
    assert mpich.scheduler == "mpich" and mpich.rank_env["WORLD_SIZE"] == "2"


def test_a_count_that_is_not_a_number_names_the_variable():
    with pytest.raises(EmberError, match="SLURM_NNODES='two'"):
        detect_cluster({**SLURM_PER_NODE, "SLURM_NNODES": "two"})


# --------------------------------------------------------------------------- LSF, PBS

LSF_BLAUNCH = {  # bsub -n 2 -R "span[ptile=1]" -gpu "num=4" ...; blaunch ember train ...: the task on the 2nd host
    "LSB_JOBID": "8123",
    "LSB_MCPU_HOSTS": "gpu01 1 gpu02 1",
    "LSB_HOSTS": "gpu01 gpu02",
    "LSF_PM_TASKID": "2",  # 1-based
}
JSRUN = {  # jsrun -n 12 -g 1 ember train ... on an IBM CSM system: the launch node leads the host list
    "LSB_JOBID": "77",
    "LSB_MCPU_HOSTS": "batch2 1 h22n07 42 h22n08 42",
    "JSM_NAMESPACE_RANK": "7",
    "JSM_NAMESPACE_SIZE": "12",
    "JSM_NAMESPACE_LOCAL_RANK": "1",
    "JSM_NAMESPACE_LOCAL_SIZE": "6",
}
REAL_JOB = ("LSB_JOBID", "PBS_JOBID", "LSB_MCPU_HOSTS", "LSB_HOSTS", "PBS_NODEFILE")  # cleared for the CLI tests


def test_lsf_blaunch_one_task_per_host_starts_an_agent_per_host():
    job = detect_cluster(LSF_BLAUNCH, lambda: 4)
    assert job == ClusterJob("lsf", 2, 1, 4, "gpu01", 28123, "8123")  # port 20000 + job id % 20000
    assert job.describe() == "lsf job 8123: 2 nodes x 4 processes; rendezvous at gpu01:28123, this is node 1"
    by_hosts = {k: v for k, v in LSF_BLAUNCH.items() if k != "LSB_MCPU_HOSTS"}  # LSB_HOSTS alone: a name per slot
    assert detect_cluster({**by_hosts, "LSF_PM_TASKID": "1"}, lambda: 4).node_rank == 0
    array = detect_cluster({**LSF_BLAUNCH, "LSB_JOBINDEX": "3"}, lambda: 4)  # elements of an array share LSB_JOBID
    assert array.run_id == "8123[3]" and array.master_port == 20000 + 81233 % 20000


def test_lsf_jsrun_ranks_meet_at_the_first_compute_host():
    job = detect_cluster(JSRUN)
    assert job.scheduler == "lsf" and not job.agents and (job.nnodes, job.nproc_per_node) == (2, 6)
    assert job.rank_env == {
        "RANK": "7",
        "WORLD_SIZE": "12",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h22n07",  # not batch2, the launch node, where no rank runs
        "MASTER_PORT": "20077",
    }
    assert detect_cluster({**JSRUN, "MASTER_ADDR": "h22n08"}).rank_env["MASTER_ADDR"] == "h22n08"


def test_mpirun_inside_an_lsf_job_needs_no_master_addr():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    ompi |= {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(EmberError, match="mpirun -x MASTER_ADDR"):  # outside a scheduler: MPI names no host
        detect_cluster(ompi)
    job = detect_cluster({**ompi, "LSB_JOBID": "5", "LSB_HOSTS": "n1 n1 n2 n2"})
    assert job.scheduler == "lsf" and job.run_id == "5" and job.nnodes == 2
    assert job.rank_env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "20005",
    }


def test_an_lsf_job_script_on_one_host_lays_out_its_gpus():
    script = {"LSB_JOBID": "9", "LSB_MCPU_HOSTS": "gpu05 8"}
    assert detect_cluster(script, lambda: 4) == ClusterJob("lsf", 1, 0, 4, "gpu05", 20009, "9")
    assert detect_cluster(script, lambda: 0) is None and single_process_job(script).run_id == "9"  # a CPU host


@pytest.mark.parametrize(
    "env,said",
    [
        ({"LSB_MCPU_HOSTS": "gpu01 four"}, r"LSB_MCPU_HOSTS='gpu01 four' is not LSF's list of hosts"),
        ({"LSB_MCPU_HOSTS": "gpu01 1 gpu02"}, r"LSB_MCPU_HOSTS='gpu01 1 gpu02' is not LSF's list"),
        (
            {"LSB_MCPU_HOSTS": "a 4 b 4", "LSF_PM_TASKID": "5"},
            r"task 5 of a job with 8 slots on 2 hosts.*span\[ptile=1\]",
        ),
        ({"LSB_MCPU_HOSTS": "a 1 b 1", "LSF_PM_TASKID": "3"}, r"task 3 of a job with 2 slots on 2 hosts"),
        ({"LSB_MCPU_HOSTS": "a 1 b 1", "LSF_PM_TASKID": "x"}, r"LSF_PM_TASKID='x' is not a number"),
        ({"LSB_MCPU_HOSTS": "a 4 b 4"}, r"spans 2 hosts \(a, b\), but this ember is its job script.*blaunch ember"),
        ({**JSRUN, "JSM_NAMESPACE_RANK": "12"}, r"jsrun says this is rank 12 of 12.*must be below the size"),
    ],
)
def test_lsf_values_ember_cannot_use_are_one_paragraph(env, said):
    with pytest.raises(EmberError, match=said) as err:
        detect_cluster({"LSB_JOBID": "1", **env}, lambda: 4)
    assert "\n" not in str(err.value) and "EMBER_NO_CLUSTER=1" in str(err.value)


@pytest.fixture
def nodefile(tmp_path) -> Path:
    """PBS's node file for select=2:ncpus=4:mpiprocs=4: a line per slot, the first host first."""
    path = tmp_path / "4711.pbs01"
    path.write_text("cn01\n" * 4 + "cn02\n" * 4)
    return path


def test_pbs_mpiexec_ranks_meet_at_the_node_files_first_host(nodefile):
    hydra = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    job = detect_cluster({"PBS_JOBID": "4711.pbs01", "PBS_NODEFILE": str(nodefile), "PBS_TASKNUM": "1", **hydra})
    assert (job.scheduler, job.run_id, job.nnodes, job.agents) == ("pbs", "4711.pbs01", 2, False)
    assert job.rank_env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "cn01",
        "MASTER_PORT": "24711",
    }
    # On a node where the node file is not (PBS keeps it on the first one), MASTER_ADDR is all that is needed.
    elsewhere = {"PBS_JOBID": "4711.pbs01", "PBS_NODEFILE": str(nodefile.parent / "absent"), **hydra}
    assert detect_cluster({**elsewhere, "MASTER_ADDR": "cn01"}).rank_env["MASTER_ADDR"] == "cn01"
    with pytest.raises(EmberError, match=r"PBS_NODEFILE=.*absent cannot be read on this host.*MASTER_ADDR"):
        detect_cluster(elsewhere)


def test_pbsdsh_one_ember_per_node_starts_an_agent_per_node(nodefile):
    task = {"PBS_JOBID": "4711.pbs01", "PBS_NODEFILE": str(nodefile), "PBS_NODENUM": "1", "PBS_VNODENUM": "4"}
    task["PBS_TASKNUM"] = "147"  # a TM task id (Torque counts them over the job), not a rank
    job = detect_cluster(task, lambda: 2)
    assert job == ClusterJob("pbs", 2, 1, 2, "cn01", 24711, "4711.pbs01")
    assert job.describe() == "pbs job 4711.pbs01: 2 nodes x 2 processes; rendezvous at cn01:24711, this is node 1"
    sister = {"PBS_JOBID": "4711.pbs01", "PBS_NODENUM": "1", "PBS_NUM_NODES": "2"}  # pbsdsh's bare environment
    with pytest.raises(EmberError, match="spans 2 nodes and PBS_NODEFILE is not set here.*MASTER_ADDR"):
        detect_cluster(sister, lambda: 2)
    assert detect_cluster({**sister, "MASTER_ADDR": "cn01"}, lambda: 2).endpoint == "cn01:24711"


def test_a_pbs_job_script_lays_out_one_node_and_refuses_several(nodefile):
    script = {"PBS_JOBID": "88.server", "PBS_NODEFILE": str(nodefile), "PBS_TASKNUM": "1", "PBS_NODENUM": "0"}
    with pytest.raises(EmberError, match=r"spans 2 nodes, but this ember is its job script.*pbsdsh -u"):
        detect_cluster(script, lambda: 4)
    nodefile.write_text("cn03\n" * 4)
    assert detect_cluster(script, lambda: 4) == ClusterJob("pbs", 1, 0, 4, "cn03", 20088, "88.server")
    assert detect_cluster(script, lambda: 0) is None and single_process_job(script).scheduler == "pbs"


def test_pbs_values_ember_cannot_use_are_one_paragraph(nodefile):
    job = {"PBS_JOBID": "7", "PBS_NODEFILE": str(nodefile)}
    nodefile.write_text("\n\n")
    with pytest.raises(EmberError, match="PBS_NODEFILE=.* lists no host"):
        detect_cluster(job, lambda: 4)
    nodefile.write_text("cn01\ncn02\n")
    with pytest.raises(EmberError, match=r"PBS_NODENUM=2, but the job has 2 nodes"):
        detect_cluster({**job, "PBS_NODENUM": "2"}, lambda: 4)
    with pytest.raises(EmberError, match=r"PBS_NODENUM='first' is not a number"):
        detect_cluster({**job, "PBS_NODENUM": "first"}, lambda: 4)
    with pytest.raises(EmberError, match=r"mpich says this is rank 2 of 2"):
        detect_cluster({**job, "PMI_RANK": "2", "PMI_SIZE": "2"})
    nodefile.write_text("# only a comment\n")
    with pytest.raises(EmberError, match="lists no host"):
        single_process_job(job, lambda: 4)


# --------------------------------------------------------------------------- the command line, launcher faked


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe("gpt", "train.max_steps=2").to_yaml())
    return path


@pytest.fixture
def launched(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(launcher, "launch", lambda nproc, argv, nodes=None: calls.append((nproc, argv, nodes)) or 0)
    for key in (
        "TORCHELASTIC_RUN_ID",
        "EMBER_NO_CLUSTER",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        *REAL_JOB,
    ):
        monkeypatch.delenv(key, raising=False)
    return calls


def train_under(env: dict[str, str], monkeypatch, recipe_file, tmp_path) -> str:
    """``ember train RECIPE --run-dir RUN`` in the scheduler's environment ``env``; returns RUN."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = str(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["ember", "train", str(recipe_file), "--run-dir", run])
    assert main(["train", str(recipe_file), "--run-dir", run]) == 0
    return run


def test_ember_train_under_slurm_starts_this_nodes_agent(monkeypatch, recipe_file, tmp_path, launched, capsys):
    run = train_under(SLURM_PER_NODE, monkeypatch, recipe_file, tmp_path)
    assert launched == [
        (4, ["train", str(recipe_file), "--run-dir", run], launcher.Nodes(2, 1, "gpu07:24242", "slurm-4242"))
    ]
    assert (
        "ember: slurm job 4242: 2 nodes x 4 processes; rendezvous at gpu07:24242, this is node 1"
        in capsys.readouterr().err
    )
    argv = ["ember", "train", str(recipe_file), "--run-dir", run, "--nproc", "2"]  # --nproc: processes per node
    monkeypatch.setattr(sys, "argv", argv)
    assert main(argv[1:]) == 0
    assert launched[-1][0] == 2 and launched[-1][1] == argv[1:-2] and launched[-1][2].count == 2


def test_ember_train_under_lsf_blaunch_starts_this_hosts_agent_and_says_so_through_logging(
    monkeypatch, recipe_file, tmp_path, launched, capsys, caplog
):
    run = train_under(LSF_BLAUNCH, monkeypatch, recipe_file, tmp_path)
    assert launched == [
        (1, ["train", str(recipe_file), "--run-dir", run], launcher.Nodes(2, 1, "gpu01:28123", "lsf-8123"))
    ]
    line = "ember: lsf job 8123: 2 nodes x 1 process; rendezvous at gpu01:28123, this is node 1"
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ember.training.cluster"]
    assert said == [("INFO", line)]
    assert line in capsys.readouterr().err  # shown at the default verbosity
    assert main(["-q", "train", str(recipe_file), "--run-dir", run]) == 0
    assert line not in capsys.readouterr().err  # and not with --quiet


def test_ember_train_on_several_nodes_needs_a_shared_run_dir(monkeypatch, recipe_file, launched, capsys):
    for key, value in SLURM_PER_NODE.items():
        monkeypatch.setenv(key, value)
    assert main(["train", str(recipe_file)]) == 2
    assert "needs --run-dir on a filesystem every node shares" in capsys.readouterr().err and not launched


def test_ember_no_cluster_trains_here_alone(monkeypatch, recipe_file, tmp_path, launched):
    for key, value in SLURM_PER_NODE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EMBER_NO_CLUSTER", "1")
    assert main(["train", str(recipe_file), "--run-dir", str(tmp_path / "run")]) == 0
    assert not launched and json.loads((tmp_path / "run" / "model.json").read_text())["step"] == 2


def test_nproc_with_a_rank_the_scheduler_started_is_refused(monkeypatch, recipe_file, tmp_path, launched, capsys):
    for key, value in SLURM_PER_GPU.items():
        monkeypatch.setenv(key, value)
    assert main(["train", str(recipe_file), "--run-dir", str(tmp_path / "run"), "--nproc", "2"]) == 2
    assert "Drop --nproc" in capsys.readouterr().err and not launched


# --------------------------------------------------------------------------- real jobs on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_tasks(
    tmp_path: Path, tasks: list[dict[str, str]], common: dict[str, str]
) -> list[subprocess.CompletedProcess]:
    """Start one ``ember train`` per entry of ``tasks`` at once, each with SLURM's variables faked."""
    import ember

    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe("gpt", "train.max_steps=3", "parallel.timeout_s=60").to_yaml())
    src = str(Path(ember.__file__).resolve().parents[1])
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EMBER_NO_CLUSTER"))}
    base |= {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    base |= {"SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(_free_port()), **common}
    command = [sys.executable, "-m", "ember", "train", str(recipe), "--run-dir", str(tmp_path / "run")]
    procs = [
        subprocess.Popen(command, env={**base, **task}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for task in tasks
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_slurm_nodes_agents_meet_and_train_as_one_job(tmp_path):
    """One task per "node" (both on this machine): each starts an agent with one worker; they meet at node 0."""
    nodes = [{"SLURM_NODEID": str(n), "SLURM_PROCID": str(n)} for n in (0, 1)]
    done = _run_tasks(tmp_path, nodes, {"SLURM_JOB_ID": "31", "SLURM_NNODES": "2", "SLURM_NTASKS": "2"})
    for n, proc in enumerate(done):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "slurm job 31: 2 nodes x 1 process; rendezvous at localhost:" in proc.stderr
        assert f", this is node {n}\n" in proc.stderr
    header = next(p.stderr for p in done if "parameters" in p.stderr)
    assert "ddp x 2" in header  # one job of world size 2, not two runs
    assert "done: step 3" in "".join(p.stdout for p in done)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["step"] == 3


@pytest.mark.slow
def test_two_slurm_tasks_are_the_two_ranks(tmp_path):
    """One task per GPU: srun started both ranks; no agent, each is told its rank."""
    tasks = [{"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NODEID": "0"} for r in (0, 1)]
    done = _run_tasks(tmp_path, tasks, {"SLURM_JOB_ID": "32", "SLURM_NNODES": "1", "SLURM_NTASKS": "2"})
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slurm job 32: rank 0 of 2 started by the scheduler" in done[0].stderr  # one line per node
    assert "slurm job 32" not in done[1].stderr
    assert "ddp x 2" in done[0].stderr and "done: step 3" in done[0].stdout and done[1].stdout == ""


# --------------------------------------------------------------------------- the shipped examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_sbatch_script_is_valid_bash_and_runs_one_ember_train_per_node():
    script = EXAMPLES / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and 'srun --kill-on-bad-exit=1 ember train "$RECIPE"' in text
    # What SLURM sets in that job's step on its second node: one agent there, one process per GPU.
    job = detect_cluster({**SLURM_PER_NODE, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "1"})
    assert job.agents and (job.nnodes, job.node_rank, job.nproc_per_node, job.master_addr) == (2, 1, 4, "n1")


def test_the_pytorchjob_is_yaml_whose_pods_run_a_valid_ember_train():
    import yaml

    from ember.cli import build_parser

    job = yaml.safe_load((EXAMPLES / "kubernetes" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    for role in ("Master", "Worker"):
        (container,) = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["command"][:2] == ["ember", "train"]
        args = build_parser().parse_args(container["command"][1:])
        assert args.run_dir == "/runs/ember-gpt" and (EXAMPLES.parent / args.recipe).is_file()


def test_a_one_process_slurm_job_trains_here_and_says_so(monkeypatch, recipe_file, tmp_path, launched, capsys):
    one = {"SLURM_JOB_ID": "123", "SLURM_NNODES": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "localhost"}
    one |= {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect_cluster(one) is None and single_process_job(one).run_id == "123"
    for key, value in one.items():
        monkeypatch.setenv(key, value)
    assert main(["train", str(recipe_file), "--run-dir", str(tmp_path / "run")]) == 0
    assert launched == [] and (tmp_path / "run" / "model.safetensors").is_file()  # trained in this process
    assert "ember: slurm job 123: 1 process, nothing to lay out; training here" in capsys.readouterr().err
