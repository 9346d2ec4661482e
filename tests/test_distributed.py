"""Data-set runs under torchrun: 2 CPU processes (gloo) give the tables of 1; a killed sharded run
resumes with 1 process; a rank that dies fails the job quickly and never marks it complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from typer.testing import CliRunner

from tokenscope.cli import app

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("forward_ms",)


def _torchrun(args: list[str], **kw) -> subprocess.Popen:  # noqa: ANN003
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENSCOPE_DIST_TIMEOUT": "60"}
    # --standalone: the rendezvous store takes a port the system gives it and keeps it (a port found
    # free and then let go could be taken in between, or still be held by an earlier job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tokenscope", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("images", "classes", "levels", "blocks"):
        df = pd.read_csv(run / "tables" / f"{name}.csv")
        out[name] = df[[c for c in df.columns if c not in TIMING]]
    return out


def _assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=False, rtol=1e-9)


def _processes() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, environment) of every process we can read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            out[int(entry.name)] = (ppid, env)
    return out


def _children_with_rank(parent: int, rank: int) -> list[int]:
    return [pid for pid, (ppid, env) in _processes().items() if ppid == parent and f"RANK={rank}".encode() in env]


def _kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own)."""
    procs = _processes()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


RUN = ["run", "--dataset", "synthetic", "--scene-size", "128", "--device", "cpu"]


def test_two_ranks_write_the_tables_of_one(tmp_path: Path) -> None:
    proc = _torchrun([*RUN, "--seeds", "100000:100005", "--no-animation", "--out", str(tmp_path / "two")])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert output.count("tokenscope run: demo") == 1  # rank 0 alone reports
    res = CliRunner().invoke(app, [*RUN, "--seeds", "100000:100005", "--no-animation", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    two, one = next((tmp_path / "two").glob("run-*")), next((tmp_path / "one").glob("run-*"))
    _assert_same_tables(two, one)
    manifest = json.loads((two / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2


def test_a_killed_two_rank_run_resumes_with_one_rank_to_the_same_tables(tmp_path: Path) -> None:
    seeds = "100000:100010"
    proc = _torchrun([*RUN, "--scene-size", "256", "--seeds", seeds, "--out", str(tmp_path / "killed")])
    deadline = time.time() + 240
    run = None
    while time.time() < deadline:
        runs = list((tmp_path / "killed").glob("run-*"))
        if runs and any(p.is_dir() and p.name.startswith("synthetic") for p in runs[0].iterdir()):
            run = runs[0]
            break
        time.sleep(0.05)
    _kill_tree(proc.pid)  # the whole job dies at once, mid-way
    proc.communicate(timeout=60)
    assert run is not None, "the sharded run wrote no image folder in time"
    done_before = [p for p in run.iterdir() if p.is_dir() and p.name.startswith("synthetic")]
    assert 1 <= len(done_before) < 10
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    res = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    straight = CliRunner().invoke(app, [*RUN, "--scene-size", "256", "--seeds", seeds, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output
    _assert_same_tables(run, next((tmp_path / "straight").glob("run-*")))


def test_a_rank_that_dies_fails_the_job_quickly_and_the_run_is_never_complete(tmp_path: Path) -> None:
    proc = _torchrun([*RUN, "--scene-size", "256", "--seeds", "100000:100020", "--out", str(tmp_path / "dies")])
    deadline = time.time() + 120
    victims: list[int] = []
    while time.time() < deadline and not victims:
        victims = _children_with_rank(proc.pid, 1)
        time.sleep(0.1)
    assert victims, "rank 1 never started"
    time.sleep(2.0)
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.time()
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        _kill_tree(proc.pid)
    assert proc.returncode != 0, output
    assert time.time() - t0 < 90
    for run in (tmp_path / "dies").glob("run-*"):
        manifest = run / "run.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"


TRAIN = ["train", "--steps", "3", "--crops", "64x4", "--size", "96", "--train-seeds", "0:6", "--no-eval", "--device", "cpu",
         "--seed", "1", "--warmup", "1", "--lr", "3e-3", "--save-every", "3"]


def _max_diff(a: dict, b: dict, policy: bool) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a
               if k.startswith("policies.learned") == policy and not k.endswith("num_batches_tracked"))


def test_ddp_training_on_two_ranks_equals_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    """Two processes with 2 images each, one with 4, and one with 2 micro-batches of 2 take the same
    steps. Tolerance: 1e-4 on the segmenter's weights after three AdamW steps at lr 3e-3 (they move
    ~1e-2; float summation order differs). The policy network is left out: its BatchNorm statistics
    are per process and per micro-batch on the CPU (SyncBatchNorm needs GPUs; used on CUDA)."""
    from safetensors.torch import load_file

    proc = _torchrun([*TRAIN, "--out", str(tmp_path / "two" / "m")])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert output.count("checkpoint:") == 1  # rank 0 alone writes and reports
    for name, extra in (("one", []), ("micro", ["--accumulate", "2"])):
        res = CliRunner().invoke(app, [*TRAIN, "--out", str(tmp_path / name / "m"), *extra])
        assert res.exit_code == 0, res.output
    one, two, micro = (load_file(str(tmp_path / n / "m.safetensors")) for n in ("one", "two", "micro"))
    assert _max_diff(one, two, policy=False) < 1e-4
    assert _max_diff(one, micro, policy=False) < 1e-4
    history = json.loads(torch.load(tmp_path / "two" / "m.train.pt", weights_only=True)["history"])
    assert len(history) == 3 and history[-1]["step"] == 3


def test_training_killed_in_one_process_resumes_on_two(tmp_path: Path) -> None:
    """Global batches are defined in images, so a run checkpointed by one process finishes on two and
    ends where an uninterrupted run ends (same tolerance and exclusion as above)."""
    from safetensors.torch import load_file

    import tokenscope as ts

    common = dict(steps=4, crops=((64, 4),), size=96, train_seeds="0:6", evaluate_after=False, device="cpu", seed=1,
                  warmup=1, lr=3e-3, save_every=2)

    class Killed(Exception):
        pass

    def kill_after_step_3(step: int, total: int, losses: dict) -> None:  # noqa: ANN001
        if step == 3:  # step 3 is done but not saved: the resumed run redoes it
            raise Killed

    try:
        ts.train(tmp_path / "split" / "m", progress=kill_after_step_3, **common)
    except Killed:
        pass
    proc = _torchrun(["train", "--steps", "4", "--crops", "64x4", "--size", "96", "--train-seeds", "0:6", "--no-eval",
                      "--device", "cpu", "--seed", "1", "--warmup", "1", "--lr", "3e-3", "--save-every", "2",
                      "--resume", "--out", str(tmp_path / "split" / "m")])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    ts.train(tmp_path / "whole" / "m", **common)
    split, whole = (load_file(str(tmp_path / n / "m.safetensors")) for n in ("split", "whole"))
    assert _max_diff(split, whole, policy=False) < 1e-4
