"""End to end on one machine: a 2-node Ray cluster (cluster/local.sh), jobs submitted to it.

The cluster is this test's own: its own temp dir, ports and auth token, never the shared
``ray_session``. Each node gets 3 logical CPUs and a Train worker asks for 2, so the two workers
of the pretraining job cannot share a node; the spare CPU per node runs Ray Data tasks.

Checks: a prepare job (`ray job submit ... --runtime-env jobs/runtime_env.yaml -- raymim prepare`)
runs its prepare tasks on both nodes (state API, by node id); a pretraining job (jobs/pretrain.sh)
prints one ``rank r/w on node ID`` line per worker, on both nodes; stopped after a checkpoint with
``ray job stop`` and submitted again with the same name, it resumes from that checkpoint and
ends at the configured step count. Every process of the cluster is gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCAL_SH = REPO / "cluster" / "local.sh"
CONFIG = "jobs/configs/mae-tiny.yaml"
STEPS, CKPT_EVERY = 30, 5
# One epoch covers every step (8 cases x 16 crops = 128 crops = 2 workers x 2 per batch x 32).
TRAIN_SETS = [
    "train.num_workers=2", "train.cpus_per_worker=2", f"train.steps={STEPS}", "train.batch_size=2",
    f"train.checkpoint_every={CKPT_EVERY}", "train.log_every=5", "train.visual_every=0",
]
PREP_SETS = ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=16"]
RANK_LINE = re.compile(r"\[raymim\] rank (\d+)/(\d+) on node ([0-9a-f]{56})")
STEP_LINE = re.compile(r"\[raymim\] step (\d+)/(\d+)")
RESUME_LINE = re.compile(r"resuming run '([^']+)' from step (\d+)")


def _free_port_block(n: int = 5) -> int:
    """A base port with ``n`` free ports after it (outside Ray's worker and the ephemeral ranges)."""
    for base in range(21000 + (os.getpid() % 200) * 40, 29000, 40):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block found")


def _pids_of(node_root: Path) -> list[str]:
    """Processes naming the cluster's temp dir (gcs, raylets, agents...) and their descendants."""
    out = subprocess.run(["pgrep", "-f", "--", f"{node_root}(/|[[:space:]]|$)"], capture_output=True, text=True)
    todo, seen = [p for p in out.stdout.split() if p != str(os.getpid())], []
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        kids = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
        todo.extend(kids)
    return seen


def _describe(pids: list[str]) -> str:
    if not pids:
        return ""
    return subprocess.run(["ps", "-o", "pid,ppid,etime,args", "-p", ",".join(pids)], capture_output=True,
                          text=True).stdout[:3000]


class Cluster:
    def __init__(self, root: Path, port: int, env: dict[str, str]):
        self.root, self.port, self.env = root, port, env
        self.address = f"http://127.0.0.1:{port + 1}"

    def run(self, args: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        return res

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([str(BIN / "ray"), *args], timeout=timeout, check=check)

    def state(self, code: str) -> object:
        """Run a short state-API snippet in a fresh interpreter (it sees only this cluster's token)."""
        pre = (f"import json\nfrom ray.util.state import list_nodes, list_tasks, list_actors\n"
               f"from ray.job_submission import JobSubmissionClient\nA = {self.address!r}\n")
        res = self.run([sys.executable, "-c", pre + code], timeout=120)
        return json.loads(res.stdout.strip().splitlines()[-1])

    def node_ids(self) -> set[str]:
        return set(self.state("print(json.dumps([n.node_id for n in list_nodes(address=A) if n.state == 'ALIVE']))"))


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("pgrep") is None:
        pytest.skip("pgrep not available")
    root = Path(tempfile.mkdtemp(prefix="rmc", dir="/tmp"))  # short: Ray's unix sockets live under it
    port = _free_port_block()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYMIM_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(root / "auth_token"),  # this cluster's own token (local.sh creates it)
        RAYMIM_LOCAL_DIR=str(root / "ray"),
        RAYMIM_LOCAL_PORT=str(port),
        RAYMIM_NODE_CPUS="3",
        RAYMIM_NODE_MEMORY_MB="3072",
        RAYMIM_NODE_OBJECT_STORE_MB="256",
        # Shared storage as the nodes see it (on one machine a local folder is shared by both).
        RAYMIM_STORAGE=str(root / "storage"),
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        RAYMIM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    c = Cluster(root, port, env)
    t0 = time.perf_counter()
    try:
        c.run(["bash", str(LOCAL_SH), "start"], timeout=240)
        print(f"cluster up in {time.perf_counter() - t0:.0f}s at {c.address}")
        env["RAY_ADDRESS"] = c.address  # for jobs/*.sh, which submit to $RAY_ADDRESS
        yield c
    finally:
        t1 = time.perf_counter()
        stop = subprocess.run(["bash", str(LOCAL_SH), "stop"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180)
        left = _pids_of(root / "ray")
        report = _describe(left)
        for pid in left:  # last resort, by pid, only this cluster's processes
            subprocess.run(["kill", "-9", pid], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        print(f"cluster stopped in {time.perf_counter() - t1:.0f}s")
        assert not left, f"processes of the test cluster survived `local.sh stop`:\n{report}\n{stop.stderr[-2000:]}"
        assert stop.returncode == 0, stop.stderr[-2000:]


def _submit_streaming(c: Cluster, args: list[str], stop_when=None, timeout: float = 300) -> tuple[str, bool]:
    """Run a blocking job submission, collecting its streamed output; ``stop_when(line)`` -> stop it."""
    proc = subprocess.Popen(args, cwd=REPO, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped, deadline = [], False, time.monotonic() + timeout
    sid = args[args.index("--submission-id") + 1] if "--submission-id" in args else c.env.get("RAYMIM_SUBMISSION_ID")
    try:
        for line in proc.stdout:
            lines.append(line)
            if time.monotonic() > deadline:
                raise AssertionError("job ran past its time limit:\n" + "".join(lines[-60:]))
            if stop_when is not None and not stopped and stop_when(line):
                c.ray("job", "stop", "--address", c.address, sid, timeout=120)
                stopped = True
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            c.ray("job", "stop", "--address", c.address, sid, timeout=60, check=False)
    return "".join(lines), stopped


def _job_status(c: Cluster, sid: str) -> str:
    return c.state(f"print(json.dumps(str(JobSubmissionClient(A).get_job_status({sid!r}).value)))")


def test_two_node_prepare_pretrain_stop_resume(cluster: Cluster):
    c = cluster
    timings: dict[str, float] = {}
    nodes = c.node_ids()
    assert len(nodes) == 2, f"expected a head and a worker node, got {nodes}"

    # Phantoms on the "shared" file system, then a prepare job exactly as the README writes it.
    t = time.perf_counter()
    synth = c.root / "synth"
    c.run([str(BIN / "raymim"), "synth", "--out", str(synth), "--cases", "8", "--size", "48", "--seed", "0"])
    sets = [a for s in PREP_SETS for a in ("--set", s)]
    out, _ = _submit_streaming(c, [
        str(BIN / "ray"), "job", "submit", "--address", c.address, "--submission-id", "prep-1",
        "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
        "raymim", "prepare", "--input", str(synth / "manifest.csv"), "--out", str(c.root / "shards"),
        "--config", CONFIG, "--no-progress", *sets,
    ], timeout=240)
    assert _job_status(c, "prep-1") == "SUCCEEDED", out[-4000:]
    assert (c.root / "shards" / "manifest.json").is_file(), out[-4000:]
    data_nodes = c.state(
        "info = JobSubmissionClient(A).get_job_info('prep-1')\n"
        "ts = list_tasks(address=A, filters=[('job_id', '=', info.job_id), ('type', '=', 'NORMAL_TASK')],"
        " detail=True, limit=10000, raise_on_missing_output=False)\n"
        "print(json.dumps(sorted({t.node_id for t in ts if t.name == 'raymim-prepare' and t.node_id})))")
    assert set(data_nodes) == nodes, f"prepare tasks ran on {data_nodes}, cluster nodes {nodes}\n{out[-3000:]}"
    timings["prepare"] = time.perf_counter() - t

    # Pretraining through the job entry; stopped once it logged a step past the first checkpoint.
    name = "mn-mae"
    pretrain = ["bash", "jobs/pretrain.sh", "--config", CONFIG, "--data", str(c.root / "shards"),
                "--name", name, *[a for s in TRAIN_SETS for a in ("--set", s)]]
    t = time.perf_counter()
    c.env["RAYMIM_SUBMISSION_ID"] = "pretrain-1"

    def past_checkpoint(line: str) -> bool:
        m = STEP_LINE.search(line)
        return bool(m) and 2 * CKPT_EVERY <= int(m.group(1)) < STEPS

    out1, stopped = _submit_streaming(c, pretrain, stop_when=past_checkpoint, timeout=300)
    assert stopped, f"the job ended before it could be stopped mid-run:\n{out1[-4000:]}"
    assert _job_status(c, "pretrain-1") == "STOPPED", out1[-3000:]
    ranks = {(int(r), n) for r, _, n in RANK_LINE.findall(out1)}
    train_nodes = {n for _, n in ranks}
    assert {r for r, _ in ranks} == {0, 1}, f"rank lines missing:\n{out1[-4000:]}"
    assert train_nodes == nodes, f"Train workers ran on {train_nodes}, cluster nodes {nodes}"
    assert any((c.root / "storage" / name).glob("checkpoint_*/meta.json")), "no checkpoint before the stop"
    timings["pretrain_until_stop"] = time.perf_counter() - t

    # The stopped job's workers must be gone (else the resubmission could not get their CPUs).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = c.state("print(json.dumps(len(list_actors(address=A, filters=[('state', '=', 'ALIVE'), "
                        "('class_name', '=', 'RayTrainWorker')], raise_on_missing_output=False))))")
        if alive == 0:
            break
        time.sleep(2)
    assert alive == 0, "Train workers of the stopped job are still alive"

    # Same command, same name: resumes from the checkpoint and ends at the configured step count.
    t = time.perf_counter()
    c.env["RAYMIM_SUBMISSION_ID"] = "pretrain-2"
    out2, _ = _submit_streaming(c, pretrain, timeout=300)
    assert _job_status(c, "pretrain-2") == "SUCCEEDED", out2[-4000:]
    resumed = RESUME_LINE.search(out2)
    assert resumed and resumed.group(1) == name, f"no resume line:\n{out2[-4000:]}"
    from_step = int(resumed.group(2))
    assert CKPT_EVERY <= from_step < STEPS and from_step % CKPT_EVERY == 0, resumed.group(0)
    steps = [int(s) for s, _ in STEP_LINE.findall(out2)]
    assert steps and min(steps) > CKPT_EVERY - 1 and max(steps) == STEPS, f"steps logged after resume: {steps}"
    assert 1 not in steps, "the resubmitted job started over from step 1"
    assert f"run {name}: {STEPS} steps" in out2
    nodes2 = {n for _, _, n in RANK_LINE.findall(out2)}
    assert nodes2 == nodes, f"resumed Train workers ran on {nodes2}"
    timings["pretrain_resume"] = time.perf_counter() - t
    print("timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
