"""One job however it is started: torchrun, SLURM's variables and Detectron2's ``--num-machines``
each give one process group that trains as one process of the same total batch does; a torchrun
restart after a killed worker ends where the uninterrupted run ends; a lost worker without
restarts ends the job within DIST.TIMEOUT_SECONDS (and as long again to name it); a checkpoint
that cannot be written and a machine without the dataset stop with one line.

Two processes each, on CPU (gloo), on 127.0.0.1.  Figures quoted in docs/distributed.md are the
times these tests print (``pytest -s``)."""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from test_distributed import LOSS_RTOL, SAME_MATH, _max_rel_diff, read_trace
from test_interrupted_training import _assert_state_close, _last_checkpoint

from hrnet_d2.engine.launch import LaunchError, detect_job_environment, first_slurm_host, slurm_master_port

QUICKSTART = REPO / "configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MAX_ITER, PERIOD = 8, 3  # checkpoints after iterations 2, 5 and 7 (model_final)
# the parity recipe of test_distributed (exhaustive sampling, fixed size, frozen norms), shorter
TRACE = [*SAME_MATH, "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
         "DIST.TIMEOUT_SECONDS", "120"]  # fmt: skip
LOSS_TRACE = str(REPO / "tests/loss_trace.py")


def _env(tmp_path, **extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(k, None)
    return dict(base, HRNET_D2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                **extra)  # fmt: skip


def _trace_args(out, output_dir, flags=(), opts=()):
    """tests/loss_trace.py's arguments: the trace file, then train_net.py's (``flags`` before the
    KEY VALUE pairs, ``opts`` after the recipe's)."""
    return [str(out), "--config-file", str(QUICKSTART), *flags, *TRACE, *opts, "OUTPUT_DIR", str(output_dir)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, log_path, timeout=300, **kwargs):
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, **kwargs)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _run_pair(make, tmp_path, name, timeout=300):
    """Start the two processes ``make(port)`` gives ([(cmd, env)] * 2) and wait for both; a port that
    turned out taken (EADDRINUSE) is retried with another one.  Returns their logs."""
    for attempt in range(3):
        port = _free_port()  # free now; another process may take it before rank 0 binds it: retried
        logs = [tmp_path / f"{name}.{i}.log" for i in range(2)]
        procs = []
        for (cmd, env), log in zip(make(port), logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other may wait for it
                time.sleep(2)
                break
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        texts = [log.read_text() for log in logs]
        if all(p.returncode == 0 for p in procs):
            return texts
        if attempt < 2 and any("EADDRINUSE" in t for t in texts):
            continue
        raise AssertionError("\n----\n".join(t[-3000:] for t in texts))


def _start_machines(tmp_path, opts, envs, **popen):
    """train_net.py on two "machines" of one process each, as srun starts them with
    ``--ntasks-per-node 1`` on two nodes (SLURM's variables; rank 0's port picked here).
    Returns the processes and their log files."""
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost",
                 SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))  # fmt: skip
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(QUICKSTART), *opts]
    procs, logs = [], [tmp_path / f"m{m}.log" for m in range(2)]
    for m in range(2):
        env = dict(envs[m], SLURM_PROCID=str(m), SLURM_NODEID=str(m), **slurm)
        with open(logs[m], "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, **popen))
    return procs, logs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process x 2 images: its loss trace, output folder and environment."""
    tmp = tmp_path_factory.mktemp("reference")
    start = time.time()
    _run([sys.executable, LOSS_TRACE, *_trace_args(tmp / "trace.jsonl", tmp / "out")], _env(tmp), tmp / "log")
    print(f"1 process x 2 images, {MAX_ITER} iterations: {time.time() - start:.1f} s")
    return read_trace(tmp / "trace.jsonl"), tmp / "out", tmp


def _assert_parity(trace, reference, what):
    assert len(trace) == len(reference) == MAX_ITER
    diff = _max_rel_diff(reference, trace)
    print(f"{what}: losses of {MAX_ITER} iterations vs 1 process x 2 images: max relative difference {diff:.2e}")
    assert diff < LOSS_RTOL


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    """torchrun, 2 processes on this machine, uninterrupted: (trace, output folder, log)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", LOSS_TRACE, *_trace_args(tmp / "t.jsonl", tmp / "out")]
    start = time.time()
    log = _run(cmd, _env(tmp), tmp / "log")
    print(f"torchrun 2 processes x 1 image, {MAX_ITER} iterations: {time.time() - start:.1f} s")
    return read_trace(tmp / "t.jsonl"), tmp / "out", log


@pytest.mark.e2e
def test_torchrun_two_processes_are_one_job(torchrun_job, reference):
    trace, out, log = torchrun_job
    assert "World size: 2" in log and "World size: 1" not in log
    _assert_parity(trace, reference[0], "torchrun")
    # one set of checkpoints and logs, written by rank 0 (rank 1 logs to log.txt.rank1)
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000002.pth", "model_0000005.pth",
                                                               "model_final.pth"]  # fmt: skip
    iterations = [r["iteration"] for r in map(json.loads, (out / "metrics.json").read_text().splitlines())]
    assert len(iterations) == len(set(iterations))  # not two trainings appending to one file
    assert (out / "log.txt.rank1").is_file() and "Rank of current process: 1. World size: 2" in (
        out / "log.txt.rank1"
    ).read_text()


@pytest.mark.e2e
def test_slurm_variables_make_one_job(tmp_path, reference):
    """Two processes with the variables srun gives two tasks on one node (no srun needed)."""

    def make(port):
        slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_NODEID="0",
                     SLURM_JOB_ID="4242", MASTER_PORT=str(port))  # fmt: skip
        cmd = [sys.executable, LOSS_TRACE, *_trace_args(tmp_path / "t.jsonl", tmp_path / "out")]
        return [(cmd, _env(tmp_path, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm)) for r in range(2)]

    start = time.time()
    logs = _run_pair(make, tmp_path, "slurm")
    print(f"SLURM variables, 2 processes: {time.time() - start:.1f} s")
    assert "World size: 2" in logs[0]
    _assert_parity(read_trace(tmp_path / "t.jsonl"), reference[0], "SLURM")


@pytest.mark.e2e
def test_detectron2_num_machines_two_on_localhost(tmp_path, reference):
    """Detectron2's own flags, two "machines" with a dataset folder each: each generates its own."""

    def make(port):
        return [
            ([sys.executable, LOSS_TRACE, *_trace_args(tmp_path / "t.jsonl", tmp_path / "out", flags=(
                "--num-machines", "2", "--machine-rank", str(m), "--dist-url", f"tcp://127.0.0.1:{port}"))],
             dict(_env(tmp_path), HRNET_D2_DATASETS=str(tmp_path / f"datasets{m}")))
            for m in range(2)
        ]  # fmt: skip

    start = time.time()
    logs = _run_pair(make, tmp_path, "machines")
    print(f"--num-machines 2 on 127.0.0.1: {time.time() - start:.1f} s")
    assert "World size: 2" in logs[0]
    for m in range(2):  # generated by local rank 0 of each machine
        assert (tmp_path / f"datasets{m}/shapes/annotations/tiny_train.json").is_file()
    _assert_parity(read_trace(tmp_path / "t.jsonl"), reference[0], "--num-machines 2")


@pytest.mark.e2e
def test_parity_fails_when_both_ranks_read_the_same_images(tmp_path, reference):
    """Negative control: two processes that each read rank 0's share of the data (what a
    launcher that gave both the same rank would do) leave the parity's tolerance."""
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", LOSS_TRACE,
           *_trace_args(tmp_path / "t.jsonl", tmp_path / "out", opts=("SOLVER.MAX_ITER", "3"))]  # fmt: skip
    _run(cmd, _env(tmp_path, HRNET_D2_TEST_SAME_DATA="1"), tmp_path / "log")
    same = read_trace(tmp_path / "t.jsonl")
    assert len(same) == 3
    diff = _max_rel_diff(reference[0][:3], same)
    print(f"both ranks on the same images: max relative difference {diff:.2e}")
    assert diff > 100 * LOSS_RTOL


def _worker_pid(agent_pid, local_rank):
    """The pid of torchrun's worker process with LOCAL_RANK ``local_rank``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"LOCAL_RANK={local_rank}".encode() in f.read().split(b"\0"):
                    return int(entry)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.e2e
def test_torchrun_restart_after_a_killed_worker_ends_like_the_uninterrupted_run(tmp_path, torchrun_job):
    """torchrun --max-restarts 1; rank 1 SIGKILLed once a checkpoint is written: the agent restarts
    both workers, which resume by themselves; weights, optimizer, scheduler and the RNG states
    of both ranks end as in the uninterrupted torchrun run."""
    full_trace, full_out, _ = torchrun_job
    out = tmp_path / "out"
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", LOSS_TRACE,
           *_trace_args(tmp_path / "t.jsonl", out)]  # fmt: skip
    start = time.time()
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not _last_checkpoint(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        tagged = _last_checkpoint(out)
        pid = _worker_pid(proc.pid, 1)
        assert pid is not None and tagged and tagged != "model_final.pth", tagged
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-4000:]
    text = (tmp_path / "log").read_text()
    print(f"killed rank 1 after {tagged}; the job finished by itself {time.time() - killed:.1f} s later "
          f"({time.time() - start:.1f} s in all)")  # fmt: skip
    resume_iter = int(tagged[len("model_") : -len(".pth")]) + 1
    assert "restart 1 of this torchrun job: resuming from the last complete checkpoint" in text
    assert f"Rank 1 resumes at iteration {resume_iter}" in (out / "log.txt.rank1").read_text()
    a = torch.load(full_out / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert len(b["trainer"]["hooks"]["ResumeState"]["rng"]) == 2  # both ranks' RNG states
    _assert_state_close(a, b, "checkpoint")  # model, optimizer, scheduler, iteration, RNG states
    trace = read_trace(tmp_path / "t.jsonl")
    assert _max_rel_diff(full_trace, trace) < LOSS_RTOL  # every iteration, those after the restart too


@pytest.mark.e2e
def test_a_stopped_machine_ends_the_job_within_the_timeout_naming_its_rank(tmp_path):
    """Two machines of one process each (SLURM's variables); machine 1 is frozen (SIGSTOP: it
    neither answers nor closes its connections, as a hung or unreachable machine).  Machine 0
    ends within DIST.TIMEOUT_SECONDS for the collective plus as long to find the rank, with one line."""
    timeout_s = 8
    opts = ["SOLVER.MAX_ITER", "400", "DIST.TIMEOUT_SECONDS", str(timeout_s), "OUTPUT_DIR", str(tmp_path / "out")]
    for attempt in range(3):
        procs, logs = _start_machines(tmp_path, [*TRACE, *opts], [_env(tmp_path)] * 2, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not _last_checkpoint(tmp_path / "out") and procs[0].poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if not _last_checkpoint(tmp_path / "out") and "EADDRINUSE" in logs[0].read_text() and attempt < 2:
                continue  # the port was taken meanwhile: another one
            assert _last_checkpoint(tmp_path / "out"), logs[0].read_text()[-3000:]
            os.killpg(procs[1].pid, signal.SIGSTOP)
            stopped = time.time()
            rc = procs[0].wait(timeout=2 * timeout_s + 60)
            took = time.time() - stopped
            break
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    text = logs[0].read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    print(f"machine 1 stopped: machine 0 ended {took:.1f} s later (DIST.TIMEOUT_SECONDS {timeout_s}): {errors}")
    assert rc == 1, text[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: lost rank 1 of 2:"), text[-3000:]
    assert "DIST.TIMEOUT_SECONDS = 8 s" in errors[0]
    assert took < 2 * timeout_s + 15  # the collective's timeout, as long to name the rank, the exit
    assert "Traceback" not in text


@pytest.mark.e2e
def test_checkpoint_that_cannot_be_written_stops_with_one_line(tmp_path, reference):
    """A file-size limit (as a full disk or a quota): one error line naming the file and the OS
    error; the previous checkpoint stays the last complete one."""
    _, ref_out, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ref_out / "model_0000002.pth", out)
    (out / "last_checkpoint").write_text("model_0000002.pth")
    limit = 4 << 20  # the logs fit, a 13 MB checkpoint does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, str(REPO / "train_net.py"), "--resume", "--config-file", str(QUICKSTART), *TRACE,
           "OUTPUT_DIR", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(reference[2]), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    print(errors)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [
        f"error: Cannot write checkpoint {out / 'model_0000005.pth'}: [Errno 27] File too large; "
        f"{out / 'model_0000002.pth'} stays the last complete checkpoint"
    ]
    assert "Traceback" not in proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith((".pth", ".tmp"))) == ["model_0000002.pth"]


@pytest.mark.e2e
def test_machine_without_the_dataset_is_named(tmp_path):
    """Two machines (SLURM's variables) with a DETECTRON2_DATASETS folder each; machine 1's lacks
    COCO: both stop, machine 0 with one line naming machine rank 1 and the missing path."""
    m0 = tmp_path / "m0"
    (m0 / "coco/annotations").mkdir(parents=True)
    (m0 / "coco/annotations/instances_val2017.json").write_text("{}")
    (m0 / "coco/val2017").mkdir()
    opts = ["DATASETS.TRAIN", '("coco_2017_val",)', "MODEL.ROI_HEADS.NUM_CLASSES", "80", "OUTPUT_DIR", tmp_path / "out"]
    envs = [dict(_env(tmp_path), DETECTRON2_DATASETS=str(tmp_path / f"m{m}")) for m in range(2)]
    for attempt in range(3):
        procs, logs = _start_machines(tmp_path, [*TRACE, *map(str, opts)], envs)
        rcs = [p.wait(timeout=300) for p in procs]
        text = logs[0].read_text()
        if "EADDRINUSE" not in text or attempt == 2:
            break
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    print(errors)
    assert rcs == [2, 2], text[-3000:]
    missing = tmp_path / "m1/coco/annotations/instances_val2017.json"
    assert len(errors) == 1 and f"missing on machine rank 1 ({socket.gethostname()})" in errors[0], text[-3000:]
    assert f"json_file {missing} does not exist" in errors[0]
    assert "Traceback" not in text


# --- launcher variables (no processes started) ------------------------------------------


def test_first_host_of_a_slurm_node_list(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the list is read here
    assert first_slurm_host("node[01-03,7],gpu5") == "node01"
    assert first_slurm_host("gpu5,node[01-03]") == "gpu5"
    assert first_slurm_host("rack[2-3]-n[07-08]") == "rack2-n07"
    assert first_slurm_host("c1") == "c1"
    with pytest.raises(LaunchError, match="cannot read a host name"):
        first_slurm_host("[")


def test_slurm_variables_give_the_job():
    slurm = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODEID="1",
                 SLURM_TASKS_PER_NODE="4(x2)", SLURM_JOB_NODELIST="node[07-08]", SLURM_JOB_ID="123456")  # fmt: skip
    job = detect_job_environment(dict(slurm, PATH=""))
    assert (job.launcher, job.rank, job.world_size, job.local_rank, job.local_world_size, job.machine_rank) == (
        "slurm", 5, 8, 1, 4, 1)  # fmt: skip
    assert (job.master_addr, job.master_port) == ("node07", slurm_master_port(123456)) == ("node07", 15000 + 3456)
    assert detect_job_environment(dict(slurm, MASTER_PORT="29400", PATH="")).master_port == 29400
    assert detect_job_environment(dict(slurm, SLURM_NTASKS="1", SLURM_PROCID="0")) is None  # one task: not a job
    with pytest.raises(LaunchError, match="numbered node by node"):  # --distribution=cyclic
        detect_job_environment(dict(slurm, SLURM_PROCID="2", PATH=""))
    with pytest.raises(LaunchError, match="different numbers of tasks"):
        detect_job_environment(dict(slurm, SLURM_TASKS_PER_NODE="4,3", PATH=""))


def test_torchrun_variables_give_the_job():
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h0", MASTER_PORT="29500",
               TORCHELASTIC_RESTART_COUNT="2", TORCHELASTIC_RUN_ID="x", SLURM_PROCID="0", SLURM_NTASKS="2")  # fmt: skip
    job = detect_job_environment(env)  # torchrun's variables win over SLURM's
    assert (job.launcher, job.rank, job.machine_rank, job.restart_count, job.master_port) == (
        "torchrun",
        3,
        1,
        2,
        29500,
    )
    assert detect_job_environment({}) is None
    with pytest.raises(LaunchError, match="LOCAL_WORLD_SIZE is not"):
        detect_job_environment({k: v for k, v in env.items() if k != "LOCAL_WORLD_SIZE"})


@pytest.mark.parametrize("script", ["train_net.py", "lazy_train_net.py"])
def test_num_gpus_under_torchrun_is_one_error_line(tmp_path, script):
    config = QUICKSTART if script == "train_net.py" else REPO / "configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py"
    env = _env(tmp_path, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="9", TORCHELASTIC_RUN_ID="test")  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / script), "--config-file", str(config), "--num-gpus", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --num-gpus 2: this process was started by torchrun as rank 0 of 2, and torchrun starts the "
        "processes itself; drop --num-gpus/--num-machines/--machine-rank/--dist-url"
    )
    assert "Traceback" not in proc.stderr
    assert re.search(r"error:", proc.stderr) and proc.stderr.count("error:") == 1
