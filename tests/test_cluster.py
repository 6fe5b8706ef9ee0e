"""The cluster path, on a live single-node SLURM (``pytest -m cluster``; tests/slurm_cluster.py
installs and starts it): a Hydra sweep through the submitit launcher, two ranks that take
their ranks from SLURM against one process with the same global batch, preempted jobs (a
two-rank batch script, and one point of a sweep) that requeue themselves and resume where
they stopped, and a local run killed with SIGKILL and resumed (in this tier for its
duration: about 20 s).

Without the marker (the default tier): the preemption checkpoint and ``resume=auto`` in one
process, and the FSDP preset's refusal on CPU; its run on GPUs is a ``gpu`` test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from tasks.framework import checkpoints, runtime
from tasks.framework.errors import UserError
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "sonnets.txt"
SMALL = ["model=lm_tiny", "data=tiny_text", f"data.train_files={CORPUS}",
         "trainer.max_steps=6", "trainer.val_check_interval=3"]
# Long enough for a signal sent after the first checkpoint to land well before the end.
LONG = ["model=lm_tiny", "data=tiny_text", f"data.train_files={CORPUS}",
        "trainer.max_steps=300", "trainer.val_check_interval=50", "trainer.log_every_n_steps=10",
        "generate.max_new_tokens=8"]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd for this host, stopped by their pids at the end."""
    try:
        ensure_installed()
    except ClusterUnavailable as exc:
        pytest.skip(f"no SLURM cluster: {exc}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def run_env(tmp_path_factory, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a training run: one data cache for the session, one thread per
    process (two processes share two cores; equal thread counts keep results comparable),
    and no variables of a SLURM job the tests themselves may run in."""
    env = {k: v for k, v in (base or os.environ).items()
           if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(ATTNKIT_DATA=str(tmp_path_factory.getbasetemp() / "data-cache"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def lm(*overrides: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.lm", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True)["state_dict"]


def val_history(run: Path) -> list[tuple[int, float]]:
    """(step, val/loss) of every validation during training, from the last checkpoint."""
    rows = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["callbacks"]["History"]
    return [(r["step"], r["val/loss"]) for r in rows["rows"] if "val/loss" in r]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run without interruption, as one local process."""
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = lm(*LONG, f"hydra.run.dir={run}", env=run_env(tmp_path_factory))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def batch_script(path: Path, *, overrides: list[str], tasks: int = 1) -> Path:
    """A batch script running the lm task with ``srun`` (one task per rank)."""
    cmd = shlex.join([sys.executable, "-m", "tasks.lm", *overrides])
    path.write_text("\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=lm",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={tasks}",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --output={path.with_suffix('.out')}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={ROOT}",
        "#SBATCH --requeue",
        f"srun --label {cmd}",
        "",
    ]))
    return path


# ------------------------------------------------------------------------------ default tier
def test_resume_auto_takes_the_newer_of_last_and_preempted(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        auto, fresh = (compose("lm", overrides=o) for o in (["resume=auto"], []))
    assert checkpoints.resume_path(auto, tmp_path) is None
    last, preempted = ckpts / "last.ckpt", checkpoints.preemption_checkpoint(tmp_path)
    for i, path in enumerate((last, preempted, last)):
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))
        assert checkpoints.resume_path(auto, tmp_path) == str(path)
    # No resume: a fresh start, except in a requeued SLURM job, which goes on.
    assert checkpoints.resume_path(fresh, tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert checkpoints.resume_path(fresh, tmp_path) == str(last)


def test_preemption_waits_for_validation_then_resumes_exactly(tmp_path, monkeypatch):
    """SIGUSR1 during the step before a validation: the checkpoint is taken one step after
    that validation (not before it, which would skip it on resume), the job is requeued, and
    ``resume=auto`` then ends with the weights and metrics of an uninterrupted run."""
    from tasks import lm as lm_task
    from tests.test_lm_task import make_cfg
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    straight, split = tmp_path / "straight", tmp_path / "split"
    lm_task.run(make_cfg(straight))  # 8 steps, validation after steps 4 and 8

    class SignalAt3(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                # Without a handler SIGUSR1 would end the test session itself.
                assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
                os.kill(os.getpid(), signal.SIGUSR1)

    requeues = []
    requeue = runtime.SlurmRequeue(split, enabled=True)
    monkeypatch.setattr(requeue, "_requeue", lambda: requeues.append(1) or True)
    build = runtime.build_trainer
    monkeypatch.setattr(runtime, "build_trainer", lambda *a, **k: build(
        *a, **k, extra_callbacks=[requeue, SignalAt3()]))
    with pytest.raises(SystemExit, match="requeued after preemption at step 5"):
        lm_task.run(make_cfg(split))
    preempted = checkpoints.preemption_checkpoint(split)
    assert requeues == [1] and torch.load(preempted, weights_only=True)["global_step"] == 5
    assert not (split / "results.json").exists()

    monkeypatch.setattr(runtime, "build_trainer", build)
    torch.manual_seed(12345)  # only the checkpoint's random state may count
    lm_task.run(make_cfg(split, "resume=auto"))
    assert not preempted.exists()  # removed once training finished
    assert_same_weights(straight / "checkpoints/last.ckpt", split / "checkpoints/last.ckpt")
    assert val_history(straight) == val_history(split) and len(val_history(split)) == 2
    a, b = results(straight), results(split)
    assert a["steps"] == b["steps"] == 8 and a["val_loss"] == b["val_loss"]


def test_fsdp_preset_needs_gpus(tmp_path):
    """Lightning 2.6 refuses FSDP without a CUDA accelerator (so the preset's run is a gpu
    test); the refusal is a one-line user error naming the setting."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("lm", overrides=[*SMALL, "trainer=fsdp", "trainer.accelerator=cpu",
                                       "trainer.devices=2", "trainer.precision=32-true"])
    assert cfg.trainer.strategy == "fsdp"
    with pytest.raises(UserError, match="strategy `fsdp` requires a GPU accelerator"):
        runtime.build_trainer(cfg, tmp_path, monitor="val/loss")


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_fsdp_preset_trains_on_gpus(tmp_path_factory, tmp_path):
    devices = min(2, torch.cuda.device_count())
    proc = lm(*SMALL, "trainer=fsdp", f"trainer.devices={devices}",
              f"hydra.run.dir={tmp_path / 'run'}", env=run_env(tmp_path_factory))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path / "run")
    assert res["steps"] == 6 and 0 < res["val_loss"] < 10


# ------------------------------------------------------------------------------ cluster tier
@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(tmp_path_factory, tmp_path,
                                                             uninterrupted):
    env, run = run_env(tmp_path_factory), tmp_path / "run"
    cmd = [sys.executable, "-m", "tasks.lm", *LONG, f"hydra.run.dir={run}"]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        t_end = time.time() + 240
        while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None:
            assert time.time() < t_end, "no checkpoint after 240 s"
            time.sleep(0.05)
        proc.kill()
        stderr = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (run / "results.json").exists()
    killed_at = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < 300

    resumed = lm(*LONG, f"hydra.run.dir={run}", "resume=auto", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(uninterrupted / "checkpoints/last.ckpt", run / "checkpoints/last.ckpt")
    a, b = results(uninterrupted), results(run)
    assert a["steps"] == b["steps"] == 300 and a["val_loss"] == b["val_loss"]


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_sweep_runs_one_slurm_job_per_point(slurm, tmp_path_factory, tmp_path):
    sweep = tmp_path / "sweep"
    proc = lm("-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", *SMALL,
              "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}",
              env=run_env(tmp_path_factory, slurm.env), timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.tail("slurmctld")
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir()
                  if p.is_dir() and "_" in p.name)  # ARRAY_TASK
    assert len(jobs) == 2 and jobs[0].split("_")[0] == jobs[1].split("_")[0], jobs  # one array
    # submitit returns once the results are written, maybe before SLURM has seen the end
    assert all(slurm.wait_job(j, 60)["JobState"] == "COMPLETED" for j in jobs)
    runs = {}
    for num in ("0", "1"):
        res = results(sweep / num)
        assert res["steps"] == 6 and res["run_dir"] == str(sweep / num)
        runs[OmegaConf.load(sweep / num / ".hydra" / "config.yaml").optimizer.lr] = \
            res["val_loss"]
    assert sorted(runs) == [1e-3, 3e-3] and runs[1e-3] != runs[3e-3]


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_two_slurm_ranks_match_one_process_with_the_same_global_batch(slurm, tmp_path_factory,
                                                                     tmp_path):
    """Two SLURM tasks with batch 4 each against one process with batch 8: every global batch
    holds the same windows (each rank takes its slice of it), all windows are full so the
    mean of the two ranks' mean losses is the one-process mean loss, and validation sums
    nats and tokens over all ranks. Only the order of float additions may differ, so the
    final validation losses agree to 1e-5 (relative); one process with batch 4, the
    per-rank batch, ends elsewhere."""
    steps = [*SMALL, "trainer.max_steps=40", "trainer.val_check_interval=20"]
    single, half = tmp_path / "single", tmp_path / "half"
    for run, batch in ((single, 8), (half, 4)):
        proc = lm(*steps, f"data.batch_size={batch}", f"hydra.run.dir={run}",
                  env=run_env(tmp_path_factory))
        assert proc.returncode == 0, proc.stderr[-3000:]

    sweep = tmp_path / "ddp"
    proc = lm("-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", *steps,
              "trainer=ddp", "trainer.devices=2", "data.batch_size=4",
              f"hydra.sweep.dir={sweep}", env=run_env(tmp_path_factory, slurm.env),
              timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.tail("slurmctld")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0"]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    one, two, other = results(single), results(sweep / "0"), results(half)
    assert one["steps"] == two["steps"] == 40
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5), (one, two)
    assert other["val_loss"] != pytest.approx(one["val_loss"], rel=1e-3)


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_preempted_job_requeues_itself_and_resumes_exactly(slurm, tmp_path_factory, tmp_path,
                                                          uninterrupted):
    """A batch script with two ranks (batch 2 each: the uninterrupted run's global batch of
    4), sent ``scancel --signal=USR1`` once the first checkpoint exists: both ranks stop at
    the same step, the job saves checkpoints/preempted.ckpt, requeues itself, and its second
    start resumes there, in the same run directory, and ends like the uninterrupted
    one-process run. Two ranks sum gradients in another order than one process (measured:
    weights apart by at most 2.4e-6 after 300 steps), so weights are compared to 1e-5; one
    optimizer step more or less moves them by about the learning rate, 1e-3."""
    run = tmp_path / "run"
    ddp = ["trainer=ddp", "trainer.devices=2", "data.batch_size=2"]
    script = batch_script(tmp_path / "preempt.sh", tasks=2,
                          overrides=[*LONG, *ddp, f"hydra.run.dir={run}"])
    job = slurm.sbatch(script, env=run_env(tmp_path_factory, slurm.env))
    signalled: list[float] = []

    def signal_after_first_checkpoint(fields):
        if (not signalled and fields.get("JobState") == "RUNNING"
                and (run / "checkpoints" / "last.ckpt").is_file()):
            slurm.command("scancel", "--signal=USR1", job)
            signalled.append(time.time())

    fields = slurm.wait_job(job, timeout=400, on_poll=signal_after_first_checkpoint,
                            interval=0.1)
    out = script.with_suffix(".out").read_text()
    assert fields["JobState"] == "COMPLETED", out[-3000:]
    assert signalled and fields["Restarts"] == "1", fields
    assert out.count("requeued SLURM job") == 1, out[-3000:]
    preempted = checkpoints.preemption_checkpoint(run)
    assert f"Restoring states from the checkpoint path at {preempted}" in out, out[-3000:]
    assert not preempted.exists()  # removed once training finished
    steps = re.findall(r"preempted at step (\d+)", out)
    assert len(steps) == 2 and steps[0] == steps[1], steps  # both ranks, at the same step
    assert_same_weights(uninterrupted / "checkpoints/last.ckpt", run / "checkpoints/last.ckpt",
                        atol=1e-5)
    a, b = results(uninterrupted), results(run)
    assert a["steps"] == b["steps"] == 300
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_preempted_sweep_point_resumes_in_its_own_run_directory(slurm, tmp_path_factory,
                                                              tmp_path, uninterrupted):
    """Through the launcher: the sweep directory holds a timestamp, the first point of two (a
    job array) is preempted, submitit runs the requeued array element again with the
    configuration it pickled, and the run goes on in the same run directory."""
    multirun = tmp_path / "multirun"
    # Point 0 trains at the task's default learning rate, like the uninterrupted run.
    default_lr = OmegaConf.load(ROOT / "conf" / "lm.yaml").optimizer.lr
    assert default_lr != 1e-3
    cmd = [sys.executable, "-m", "tasks.lm", "-m", "hydra/launcher=slurm_cpu",
           "hydra.launcher.cpus_per_task=1", *LONG, f"optimizer.lr={default_lr},1e-3",
           f"hydra.sweep.dir={multirun}/" + "${now:%Y-%m-%d_%H-%M-%S}"]
    with subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path_factory, slurm.env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        t_end, job = time.time() + 400, None
        while proc.poll() is None:
            assert time.time() < t_end, "the sweep did not finish in 400 s"
            if job is None and list(multirun.glob("*/0/checkpoints/last.ckpt")):
                job = next(multirun.glob("*/.submitit/*_0")).name  # ARRAY_TASK
                slurm.command("scancel", "--signal=USR1", job)
            elif job is not None:
                slurm.release_requeued(job, slurm.job(job))
            time.sleep(0.1)
        stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr[-3000:]
    assert job is not None and slurm.wait_job(job, 60)["Restarts"] == "1"
    (sweep,) = multirun.iterdir()
    log = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
    assert log.count(f"requeued SLURM job {job}") == 1, log[-3000:]
    assert_same_weights(uninterrupted / "checkpoints/last.ckpt",
                        sweep / "0" / "checkpoints/last.ckpt")
    assert results(sweep / "0")["val_loss"] == results(uninterrupted)["val_loss"]
    assert results(sweep / "1")["steps"] == 300
