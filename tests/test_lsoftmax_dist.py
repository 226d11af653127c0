"""Data-parallel training on MXNet's parameter server, on loopback (127.0.0.1, free ports):
2 workers, 1 server and the scheduler reach single-process training on the concatenated
batch; faults end in bounded time with every process gone."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import mx_lsoftmax
from mx_lsoftmax import launch as launcher
from mx_lsoftmax.support.data import resolve_directory

from conftest import ROOT, compiled_available, load_example

WORKER = os.path.join(ROOT, "tests", "lsoftmax_dist_worker.py")
TIME_LIMIT = 120  # seconds for any job here; the launcher stops everything after it


def all_gone(job):
    for _, process in job.processes:
        assert process.returncode is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)  # no process of its group is left


def single_process(api, backend):
    sys.path.insert(0, os.path.dirname(WORKER))
    import lsoftmax_dist_worker as worker
    return worker.TRAIN[api]("cosface", backend, worker.global_batches(), None, 1), worker.STEPS


@pytest.mark.parametrize("api", ["gluon", "module"])
def test_two_workers_equal_single_process_training(backend, api, tmp_path):
    job = launcher.Job()
    code = launcher.launch([sys.executable, WORKER, "--api", api, "--backend", backend, "--out", str(tmp_path)],
                           workers=2, servers=1, timeout=TIME_LIMIT, grace=5, log=print, job=job)
    assert code == 0
    all_gone(job)
    reference, steps = single_process(api, backend)
    for rank in (0, 1):
        result = np.load(tmp_path / f"{api}-rank{rank}.npz")
        np.testing.assert_allclose(result["weight"], reference["weight"], rtol=1e-5, atol=1e-12)
        # The schedule: never exchanged, the same on every worker because every worker steps alike.
        assert result["step"].tolist() == [steps]
        if api == "gluon":
            np.testing.assert_allclose(result["betas"], reference["betas"], rtol=1e-12)
    import lsoftmax_dist_worker as worker  # training moved the weights: the comparison is not vacuous
    assert np.abs(reference["weight"] - worker.initial_weight()).max() > 1e-3


def test_plain_dmlc_variables_keep_working(tmp_path):
    """The processes started by hand with the DMLC_* variables alone, as MXNet documents."""
    port = launcher.free_port()
    processes = []
    try:
        for role, command in (("scheduler", launcher.ROLE_COMMAND), ("server", launcher.ROLE_COMMAND),
                              ("worker", [sys.executable, WORKER, "--api", "gluon", "--out", str(tmp_path)]),
                              ("worker", [sys.executable, WORKER, "--api", "gluon", "--out", str(tmp_path)])):
            environment = {**os.environ, **launcher.role_environment(role, "127.0.0.1", port, 2, 1, "127.0.0.1")}
            processes.append(subprocess.Popen(command, env=environment, start_new_session=True))
        for process in processes:
            assert process.wait(timeout=TIME_LIMIT) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    assert (tmp_path / "gluon-rank0.npz").exists() and (tmp_path / "gluon-rank1.npz").exists()


FAULTY_WORKER = """
import os, mxnet as mx
kv = mx.kv.create("dist_sync")
kv.init(0, mx.nd.zeros((3,)))
if kv.rank == 1:
    os.kill(os.getpid(), 9)  # killed mid-run
for _ in range(100000):
    kv.push(0, mx.nd.ones((3,)))
    out = mx.nd.zeros((3,))
    kv.pull(0, out=out)
    out.wait_to_read()
"""


def test_a_killed_worker_stops_the_job_in_bounded_time(capsys):
    job = launcher.Job()
    start = time.monotonic()
    code = launcher.launch([sys.executable, "-c", FAULTY_WORKER], workers=2, servers=1, timeout=TIME_LIMIT,
                           grace=2, log=print, job=job)
    elapsed = time.monotonic() - start
    assert code == 1 and elapsed < 30  # without the launcher the other worker waits forever
    assert "stopped with signal 9 (SIGKILL)" in capsys.readouterr().out
    all_gone(job)


def test_timeout_stops_a_hanging_job(capsys):
    job = launcher.Job()
    code = launcher.launch([sys.executable, "-c", "import time; time.sleep(600)"], workers=2, servers=1,
                           timeout=2, grace=1, log=print, job=job)
    assert code == 124 and "ran past --timeout 2 s" in capsys.readouterr().out
    all_gone(job)


def test_launcher_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        launcher.main(["--workers", "2"])
    assert stop.value.code == 2 and "give the worker command after --" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        launcher.main(["--workers", "0", "--", "true"])
    assert stop.value.code == 2
    (tmp_path / "hosts").write_text("# nothing\n\n")
    with pytest.raises(SystemExit, match="names no host"):
        launcher.main(["--hostfile", str(tmp_path / "hosts"), "--", "true"])


@pytest.mark.parametrize("example", ["train_mnist", "train_mnist_module"], ids=["gluon", "module"])
def test_train_mnist_two_workers_write_one_log_and_resume(tmp_path, example):
    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
    script = os.path.join(ROOT, "examples", example + ".py")
    common = ["--kvstore", "dist_sync", "--train-limit", "2000", "--test-limit", "500", "--no-progress",
              "--loss", "arcface", "--s", "16", "--margin", "0.3", "--beta", "100", "--scale", "0.9", "--lr-steps"]
    first = [sys.executable, script, *common, "--epochs", "1", "--save", str(tmp_path / "ckpt"),
             "--json", str(tmp_path / "first.json")]
    assert launcher.launch(first, workers=2, servers=1, timeout=TIME_LIMIT, grace=5) == 0
    summary = json.loads((tmp_path / "first.json").read_text())
    assert summary["num_workers"] == 2 and summary["settings"]["kvstore"] == "dist_sync"
    assert len(summary["epochs"]) == 1
    resumed = [sys.executable, script, *common, "--epochs", "2", "--resume", str(tmp_path / "ckpt"),
               "--json", str(tmp_path / "second.json")]
    assert launcher.launch(resumed, workers=2, servers=1, timeout=TIME_LIMIT, grace=5) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert [entry["epoch"] for entry in second["epochs"]] == [2]
    assert second["test_accuracy"] > 0.3
    # The schedule went on from the checkpoint: beta at the end is the schedule's at 2 epochs of steps.
    steps = 2 * (1000 // 128)  # each worker: 1000 images, whole batches
    assert second["epochs"][-1]["beta"] == pytest.approx(mx_lsoftmax.MarginSettings("arcface", s=16, margin=0.3, beta=100, scale=0.9).beta_at(steps))
