"""The multi-node launch examples in scripts/launch/.

The SLURM batch script runs here against stub ``srun``/``scontrol``/``scancel`` commands that
record their arguments: it must build the documented torchrun command, pass the user's
arguments through, stop the step cleanly on the time-limit signal and requeue, and wait for
training on SIGTERM. torchrun's own argument parser checks every flag. The PyTorchJob example
must parse and expand to the same kind of torchrun command under both generations of the
operator's environment.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "scripts" / "launch"
SBATCH = LAUNCH / "slurm_train.sbatch"
PYTORCHJOB = LAUNCH / "pytorchjob.yaml"
JOB_ID = "4242"

# Stand-ins for the SLURM commands: each appends its arguments to a file under $STUB_LOG.
STUBS = {
    "scontrol": r"""#!/bin/bash
printf '%s\n' "$*" >> "$STUB_LOG/scontrol"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu017\ngpu018\n'; fi
""",
    # STUB_SRUN_RUNS: keep running like a training step until SIGTERM, then exit 1 as torchrun
    # does after a clean stop; otherwise exit at once with STUB_SRUN_EXIT.
    "srun": r"""#!/bin/bash
printf '%s\0' "$@" > "$STUB_LOG/srun.args"
if [[ -n "${STUB_SRUN_RUNS:-}" ]]; then
    trap 'exit 1' TERM
    echo $$ > "$STUB_LOG/srun.pid.tmp" && mv "$STUB_LOG/srun.pid.tmp" "$STUB_LOG/srun.pid"
    while :; do sleep 0.05; done
fi
exit "${STUB_SRUN_EXIT:-0}"
""",
    # scancel --signal=TERM <job>: deliver SIGTERM to the running step, as slurmd would.
    "scancel": r"""#!/bin/bash
printf '%s\n' "$*" >> "$STUB_LOG/scancel"
kill -TERM "$(cat "$STUB_LOG/srun.pid")"
""",
}

# Stand-in for torchrun in the PyTorchJob's container: records the arguments the shell expanded.
STUB_TORCHRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$STUB_LOG"
"""


@pytest.fixture
def slurm(tmp_path):
    """Stub SLURM commands on PATH and a 2-node job environment; returns (env, log dir)."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    for key in ("RUN_NAME", "RDZV_PORT", "RDZV_HOST", "MAX_RESTARTS", "SEG_ROOT"):
        env.pop(key, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        STUB_LOG=str(log_dir),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NODELIST="gpu[017-018]",
        SLURM_NNODES="2",
        SLURM_GPUS_PER_NODE="a100:4",
        SLURM_CPUS_PER_TASK="32",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    return env, log_dir


def run_sbatch(env, *args):
    return subprocess.run(
        ["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30
    )


def srun_args(log_dir: Path) -> list[str]:
    return (log_dir / "srun.args").read_text().split("\0")[:-1]


def log_lines(log_dir: Path, name: str) -> list[str]:
    path = log_dir / name
    return path.read_text().splitlines() if path.exists() else []


def torchrun_args(args: list[str]):
    """torchrun's own parser: an unknown or misspelt flag fails here."""
    return get_args_parser().parse_args(args)


def start_running_step(env, log_dir):
    """The batch script with a step that runs until signalled; returns (script, step pid)."""
    script = subprocess.Popen(
        ["bash", str(SBATCH), "experiment=cityscapes_unet"],
        env={**env, "STUB_SRUN_RUNS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not (log_dir / "srun.pid").exists():
        assert script.poll() is None, script.communicate()
        assert time.monotonic() < deadline, "the batch script never started srun"
        time.sleep(0.02)
    return script, int((log_dir / "srun.pid").read_text())


def stop(script, step_pid):
    """Leave no process behind when a test fails half-way."""
    for pid in (step_pid, script.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    script.communicate()


def test_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_sbatch_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_launches_one_torchrun_per_node_on_the_jobs_rendezvous(slurm):
    env, log_dir = slurm
    user_args = ["experiment=cityscapes_unet", "data.root=/shared/city scapes", "model.x=[1,2]"]
    result = run_sbatch(env, *user_args)
    assert result.returncode == 0, result.stderr
    port = 20000 + int(JOB_ID) % 20000
    assert srun_args(log_dir) == [
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=4",  # "a100:4" from --gpus-per-node, type stripped
        f"--rdzv_id={JOB_ID}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu017:{port}",  # the first host of the node list
        "--max-restarts=3",
        "train.py",
        "resume=auto",
        *user_args,  # unchanged, in order, spaces and brackets included
    ]
    parsed = torchrun_args(srun_args(log_dir)[3:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_endpoint) == (
        "2",
        "4",
        f"gpu017:{port}",
    )
    assert (parsed.max_restarts, parsed.training_script) == (3, "train.py")
    assert parsed.training_script_args == ["resume=auto", *user_args]
    assert log_lines(log_dir, "scontrol") == ["show hostnames gpu[017-018]"]  # no requeue
    assert not (log_dir / "scancel").exists()


def test_run_name_port_restarts_and_gpu_count_come_from_the_environment(slurm):
    env, log_dir = slurm
    del env["SLURM_GPUS_PER_NODE"]  # no --gpus-per-node: torchrun counts the GPUs itself
    env.update(RUN_NAME="city-r50", RDZV_PORT="29400", MAX_RESTARTS="0")
    result = run_sbatch(env, "trainer.max_iters=100")
    assert result.returncode == 0, result.stderr
    args = srun_args(log_dir)
    assert "--nproc_per_node=gpu" in args
    assert "--rdzv_endpoint=gpu017:29400" in args and "--max-restarts=0" in args
    assert args[args.index("train.py") :] == [
        "train.py",
        "resume=auto",
        "run_name=city-r50",
        "trainer.max_iters=100",
    ]
    torchrun_args(args[3:])


def test_a_failed_training_is_the_jobs_status_and_is_not_requeued(slurm):
    env, log_dir = slurm
    result = run_sbatch({**env, "STUB_SRUN_EXIT": "3"}, "experiment=cityscapes_unet")
    assert result.returncode == 3
    assert not any(line.startswith("requeue") for line in log_lines(log_dir, "scontrol"))


def test_time_limit_signal_stops_the_step_with_sigterm_and_requeues(slurm):
    env, log_dir = slurm
    script, step_pid = start_running_step(env, log_dir)
    try:
        script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 delivers
        _, stderr = script.communicate(timeout=20)
    finally:
        stop(script, step_pid)
    # SIGTERM to the job's steps through scancel (srun would turn SIGTERM into SIGKILL).
    assert log_lines(log_dir, "scancel") == [f"--signal=TERM {JOB_ID}"]
    assert log_lines(log_dir, "scontrol")[-1] == f"requeue {JOB_ID}"
    assert script.returncode == 1, stderr  # the step's status once it has stopped
    assert "time limit near" in stderr


def test_sigterm_to_the_batch_shell_waits_for_training_and_does_not_requeue(slurm):
    env, log_dir = slurm
    script, step_pid = start_running_step(env, log_dir)
    try:
        script.send_signal(signal.SIGTERM)  # scancel / preemption: SLURM signals the step too
        time.sleep(0.5)
        assert script.poll() is None, "the batch shell must outlive the step while rank 0 saves"
        os.kill(step_pid, signal.SIGTERM)  # the step stops
        _, stderr = script.communicate(timeout=20)
    finally:
        stop(script, step_pid)
    assert script.returncode == 1, stderr
    assert not (log_dir / "scancel").exists()
    assert not any(line.startswith("requeue") for line in log_lines(log_dir, "scontrol"))


def test_submitting_from_elsewhere_or_without_sbatch_fails_before_srun(slurm, tmp_path):
    env, log_dir = slurm
    result = run_sbatch({**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, "experiment=cityscapes_unet")
    assert result.returncode == 2
    assert "submit from the seg repository root or set SEG_ROOT" in result.stderr
    outside = {key: value for key, value in env.items() if key != "SLURM_JOB_ID"}
    result = run_sbatch(outside, "experiment=cityscapes_unet")
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr
    assert not (log_dir / "srun.args").exists()


def pod_container(replica):
    (container,) = replica["template"]["spec"]["containers"]
    return container


def test_pytorchjob_runs_torchrun_with_outputs_on_the_shared_volume():
    job = yaml.safe_load(PYTORCHJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        container = pod_container(replica)
        assert container["name"] == "pytorch"  # the operator's env and port go to this name
        assert replica["restartPolicy"] == "OnFailure"
        command = " ".join(container["command"] + container["args"])
        assert "exec torchrun" in command and "--rdzv_backend=c10d" in command
        assert "train.py resume=auto" in command
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        # output_root is a mounted PersistentVolumeClaim, so last.pt outlives the pods.
        output_root = next(
            w.split("=", 1)[1] for w in command.split() if w.startswith("output_root=")
        )
        assert "persistentVolumeClaim" in volumes[mounts[output_root]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = {item["name"]: item["value"] for item in container["env"]}
        assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]


@pytest.mark.parametrize(
    "operator_env",
    [
        {"WORLD_SIZE": "2", "RANK": "1"},  # older operators: WORLD_SIZE counts pods
        {"WORLD_SIZE": "8", "RANK": "1", "PET_NNODES": "2", "PET_NODE_RANK": "1"},  # newer
    ],
)
def test_pytorchjob_command_expands_to_a_valid_torchrun_call(tmp_path, operator_env):
    job = yaml.safe_load(PYTORCHJOB.read_text())
    container = pod_container(job["spec"]["pytorchReplicaSpecs"]["Worker"])
    (tmp_path / "torchrun").write_text(STUB_TORCHRUN)
    (tmp_path / "torchrun").chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(tmp_path / "torchrun.args"),
        "MASTER_ADDR": "seg-train-master-0",
        "MASTER_PORT": "23456",
        **operator_env,
    }
    subprocess.run(container["command"] + container["args"], env=env, check=True, timeout=30)
    args = (tmp_path / "torchrun.args").read_text().split("\0")[:-1]
    parsed = torchrun_args(args)
    assert parsed.nnodes == "2"  # pods, not processes, under both operator generations
    assert parsed.rdzv_endpoint == "seg-train-master-0:23456"
    assert (parsed.rdzv_backend, parsed.nproc_per_node) == ("c10d", "gpu")
    assert parsed.training_script == "train.py"
    assert parsed.training_script_args[0] == "resume=auto"
