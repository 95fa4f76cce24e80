"""jobs.tune on a real local Ray cluster (4 logical CPUs) with a real mlflow server and the tiny demo model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gan_core.checkpoint import read_checkpoint
from gan_core.config import ConfigError
from jobs import tune
from jobs.tracking.model_source import resolve_model
from tests.jobs.conftest import REPO, tiny_overrides

DEMO = REPO / "jobs" / "configs" / "demo.yaml"
# Constant LR, no EMA: validation then tells the learning rates apart after 2 steps. The tiny generator starts
# near bicubic (PSNR-Y ~27.4 dB on the demo crops) and keeps it with 1e-7; 5e-2 wrecks it (~19 dB, then ~10 dB).
GOOD_LR, BAD_LR = 1e-7, 5e-2
SHARP = {"schedule.lr_schedule": "constant", "schedule.warmup_steps": "0", "train.ema_decay": "0"}


def write_space(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base: {DEMO}\nmetric: val/psnr_y\nmode: max\nnum_samples: 1\n{body}")
    return str(path)


def child_runs(client: MlflowClient, parent_run_id: str) -> dict[str, object]:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags["gan.trial_id"]: run for run in runs}


def wait_for_free_cpus(ray, expected: float, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= expected:
            return free
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0.0)


def what_holds_cpus(ray) -> str:
    """For a failure message: the live placement groups and actors (GCS tables; no dashboard needed)."""
    from ray._private.state import state

    groups = [f"{pg_id[:8]} {pg['state']} {pg['name']!r} {list(pg['bundles'].values())}"
              for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]
    actors = [f"{a['ActorClassName']} {a['Name']!r} pid {a['Pid']}"
              for a in state.actor_table(None).values() if a["State"] != "DEAD"]
    return f"available {ray.available_resources()}; placement groups {groups}; live actors {actors}"


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local cluster of the sweeps' own (shadows the session one): the CPU checks below then count only what
    the sweeps hold, and PBT gets the two concurrent trials it needs. Its processes get the S3 server's AWS_*
    variables, as in the session cluster (the PBT sweep keeps its state and checkpoints in the bucket)."""
    import ray

    os.environ.update(s3_server.env)
    ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_stopped_trial_frees_its_workers_when_train_does_not_abort_in_time(ray_local):
    """A Train controller that is slow to abort (Train waits ~10 s for its state-API cleaner where there is no
    dashboard; Tune kills a stopping trial at 10 s): the trial removes the workers' placement group itself."""
    from ray.util.placement_group import placement_group
    from ray.util.queue import Queue

    from jobs.sweeps import trial as tune_trial

    @ray_local.remote(num_cpus=0)
    class SlowController:
        def abort(self):
            time.sleep(60)

    @ray_local.remote(num_cpus=0.5)
    class Worker:
        def ping(self):
            return "pong"

    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray_local.get(group.ready(), timeout=30)
    strategy = ray_local.util.scheduling_strategies.PlacementGroupSchedulingStrategy(group)
    workers = [Worker.options(scheduling_strategy=strategy).remote() for _ in range(2)]
    assert ray_local.get([w.ping.remote() for w in workers]) == ["pong", "pong"]
    controller = SlowController.remote()
    assert wait_for_free_cpus(ray_local, 4.0, timeout=2.0) == 3.0

    tune_trial._live_run.update(controller=controller, placement_group=group,
                                acks=Queue(maxsize=1, actor_options={"num_cpus": 0}))
    started = time.time()
    tune_trial.stop_train_run(abort_wait_s=1.0)
    assert time.time() - started < 8.0  # well inside Tune's 10 s
    assert not tune_trial._live_run
    assert wait_for_free_cpus(ray_local, 4.0) == 4.0, what_holds_cpus(ray_local)
    assert ray_local.util.placement_group_table(group)["state"] == "REMOVED"
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(controller.abort.remote(), timeout=30)


@pytest.mark.slow
def test_asha_sweep_stops_poor_trials_and_nests_trial_runs(ray_local, mlflow_server, demo_data, tmp_path):
    space = write_space(tmp_path, "asha", """
scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
param_space:
  optim.g_lr: {grid: [1.0e-7, 1.0e-7, 5.0e-2]}
""")
    # Test-only packing (0.5 CPU per worker and per trial driver, 1 CPU kept for Ray Data): two trials at once
    # on the 4 logical CPUs. The two good trials come first, so the bad one always meets both at the rung.
    # (Two good trials show that equal configs score the same; one bad trial is enough to be stopped: a second
    # one cost another Train run, ~20 s on 2 cores.)
    argv = ["--space", space, "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--trial-cpus", "0.5",
            "--name", "asha", "--tracking-uri", mlflow_server,
            *tiny_overrides(demo_data, tmp_path / "runs", steps=4, **SHARP)]
    summary = tune.main(argv)

    rows = {row["trial"]: row for row in summary["trials"]}
    assert len(rows) == 3
    client = MlflowClient(mlflow_server)
    children = child_runs(client, summary["parent_run_id"])
    # The seed fixes the run, even with two trials training side by side: equal configs score exactly the same.
    # (A 2e-5 dB drift once let ASHA stop a 1e-7 trial that met its twin's score at the rung.)
    rung = {trial_id: [m.value for m in client.get_metric_history(children[trial_id].info.run_id, "val/psnr_y")
                       if m.step == 2] for trial_id, row in rows.items() if row["params"]["optim.g_lr"] == GOOD_LR}
    assert len(rung) == 2 and len({tuple(values) for values in rung.values()}) == 1, rung
    statuses = sorted(row["status"] for row in rows.values())
    assert statuses.count("stopped early") >= 1 and "finished" in statuses and "error" not in statuses, statuses
    for row in rows.values():  # ASHA stopped the 5e-2 trial at the step-2 rung, where 1e-7 leads by ~8 dB
        assert (row["status"], row["step"]) == (("finished", 4) if row["params"]["optim.g_lr"] == GOOD_LR else
                                                ("stopped early", 2)), row
    best = summary["best"]
    assert best["params"] == {"optim.g_lr": GOOD_LR} and best["status"] == "finished" and best["step"] == 4
    assert summary["failure"] is None  # trials stopped by ASHA are no failure: the command exits 0
    assert (Path(best["checkpoint"]) / "checkpoint.pt").is_file()
    # Stopped trials aborted their Train runs: no worker keeps a CPU once the sweep is over.
    assert wait_for_free_cpus(ray_local, 4.0) == 4.0, what_holds_cpus(ray_local)

    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"asha.yaml", "base_config.yaml", "trials.csv", "trials.txt", "best_config.yaml", "best_params.json",
            "metric_vs_params.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["best/val/psnr_y"] == pytest.approx(best["metric_best"])
    assert parent.data.tags["best_run_id"] == best["run_id"]
    assert parent.data.metrics["tune/stopped_early"] == statuses.count("stopped early")
    assert set(children) == set(rows)
    for trial_id, row in rows.items():
        child = children[trial_id]
        assert child.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")
        assert child.data.tags["tune.stopped_early"] == str(row["status"] == "stopped early").lower()
        assert float(child.data.params["optim.g_lr"]) == row["params"]["optim.g_lr"]
        # The child is the trial's training run itself: rank 0 logged every step there.
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "g/pix")]
        assert steps[: row["step"]] == list(range(1, row["step"] + 1))
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/psnr_y")][:1] == [2]

    # The same command again resumes the sweep: it is complete, so nothing trains and the same runs are used.
    again = tune.main(argv)
    assert again["parent_run_id"] == summary["parent_run_id"]
    assert {row["trial"]: row["status"] for row in again["trials"]} == {t: r["status"] for t, r in rows.items()}
    assert len(child_runs(client, parent.info.run_id)) == 3


@pytest.mark.slow
def test_pbt_exploit_restarts_from_donor_step_with_mutated_lr(ray_local, mlflow_server, demo_data, s3_server,
                                                              tmp_path):
    """PBT with the sweep on S3 (run.storage_path=s3://...): Tune's experiment state, every trial's checkpoints and
    the exploit's restore from the donor's checkpoint all go through the bucket."""
    assert wait_for_free_cpus(ray_local, 4.0) == 4.0, what_holds_cpus(ray_local)  # PBT needs both trials at once
    # Two trials share the 4 CPUs (0.5 CPU for the one worker and for the trial driver, 1 CPU left for Ray Data);
    # synch PBT perturbs once, at step 4, when both are there: the 5e-2 trial must clone the 1e-7 one.
    # One worker per trial: DDP inside a trial is the ASHA test's; here a worker process less per trial start
    # (3 starts: 2 trials and the exploit's restart).
    space = write_space(tmp_path, "pbt", """
scheduler:
  name: pbt
  perturbation_interval: 4
  quantile_fraction: 0.5
  resample_probability: 0.0
  synch: true
  hyperparam_mutations:
    optim.g_lr: {loguniform: [1.0e-8, 1.0e-1]}
param_space:
  optim.g_lr: {grid: [1.0e-7, 5.0e-2]}
""")
    summary = tune.main(["--space", space, "--workers-per-trial", "1", "--cpus-per-worker", "0.5", "--trial-cpus",
                         "0.5", "--name", "pbt", "--tracking-uri", mlflow_server,
                         *tiny_overrides(demo_data, tmp_path / "runs", steps=6,
                                         **{**SHARP, "run.storage_path": s3_server.url("pbt")})])

    rows = {row["trial"]: row for row in summary["trials"]}
    assert not (tmp_path / "runs").exists(), "nothing of the sweep on the local disk"
    stored = s3_server.keys("pbt/")
    assert any(key.endswith("checkpoint.pt") for key in stored)
    assert any("experiment_state" in key or "tuner.pkl" in key for key in stored), sorted(stored)[:20]
    exploits = [record for row in rows.values() for record in row["exploits"]]
    assert len(exploits) == 1, exploits
    (record,) = exploits
    donor, exploited = rows[record["donor"]], rows[record["trial"]]
    assert donor["params"]["optim.g_lr"] == GOOD_LR and record["old"] == {"optim.g_lr": BAD_LR}
    new_lr = record["new"]["optim.g_lr"]
    assert new_lr == pytest.approx(GOOD_LR * 0.8) or new_lr == pytest.approx(GOOD_LR * 1.2)  # perturbed donor value
    assert record["step"] == 4
    assert exploited["params"]["optim.g_lr"] == new_lr and exploited["status"] == "finished" and exploited["step"] == 6

    # After the restart the exploited trial continued from the donor's step 4 (steps 5, 6 only) with the new LR.
    client = MlflowClient(mlflow_server)
    run_id = exploited["run_id"]
    (marker,) = client.get_metric_history(run_id, "tune/exploits")
    assert marker.step == 4
    after = [m for m in client.get_metric_history(run_id, "g/pix") if m.timestamp >= marker.timestamp]
    assert sorted(m.step for m in after) == [5, 6]
    lr_after = [m for m in client.get_metric_history(run_id, "lr/g") if m.timestamp >= marker.timestamp]
    assert [m.step for m in sorted(lr_after, key=lambda m: m.step)] == [5, 6]
    assert all(m.value == pytest.approx(new_lr) for m in lr_after)
    lr_before = [m.value for m in client.get_metric_history(run_id, "lr/g") if m.step <= 4]
    assert lr_before and all(v == pytest.approx(BAD_LR) for v in lr_before)
    # The optimizer in the trial's final checkpoint holds the new LR; the checkpoint names the trial's own run.
    assert exploited["checkpoint"].startswith(s3_server.url("pbt"))
    payload = read_checkpoint(resolve_model(exploited["checkpoint"], tmp_path / "download").path)
    assert payload["step"] == 6 and payload["config"]["optim"]["g_lr"] == pytest.approx(new_lr)
    assert payload["g_optimizer"]["param_groups"][0]["lr"] == pytest.approx(new_lr)
    assert payload["extra"]["mlflow_run_id"] == run_id
    tags = client.get_run(run_id).data.tags
    assert "tune.exploit.1" in tags and record["donor"] in tags["tune.exploit.1"]
    exploit_files = [a.path for a in client.list_artifacts(summary["parent_run_id"], "exploits")]
    assert exploit_files == [f"exploits/{record['trial']}_step0000004.json"]


@pytest.mark.slow
def test_sweep_with_failed_trials_exits_1_after_the_summary(ray_local, mlflow_server, demo_data, tmp_path, capsys,
                                                            monkeypatch):
    """Trials that fail inside their workers (data.val is an empty folder: only the worker reads it): the command
    prints the table, then exits 1, whether all trials or only some failed; the sweep's run is FAILED only
    when none succeeded. The tracking URI carries a password (the server ignores it): no line shows it."""
    empty_val = tmp_path / "empty-val"
    empty_val.mkdir()
    credentialed = mlflow_server.replace("http://", "http://gan:s3cret-pw@")
    summaries = []
    main = tune.main
    monkeypatch.setattr(tune, "main", lambda argv: summaries.append(main(argv)) or summaries[-1])

    def sweep(name: str, param_space: str) -> tuple[int, dict, str]:
        space = write_space(tmp_path, name, f"param_space:\n{param_space}")
        argv = ["--space", space, "--workers-per-trial", "1", "--cpus-per-worker", "0.5", "--trial-cpus", "0.5",
                "--name", name, "--tracking-uri", credentialed,
                *tiny_overrides(demo_data, tmp_path / "runs", steps=2, **{"run.max_failures": "0"})]
        with pytest.raises(SystemExit) as exited:
            tune.cli(argv)
        captured = capsys.readouterr()
        return exited.value.code, summaries[-1], captured.out + captured.err

    # Every trial fails.
    code, summary, output = sweep("all-failed", f"  data.val: {{grid: ['{empty_val}']}}\n")
    assert code == 1
    assert [row["status"] for row in summary["trials"]] == ["error"]
    assert summary["best"] is None and summary["failure"].startswith("all 1 trial(s) errored")
    for row in summary["trials"]:  # the summary names each trial's cause, not Ray's wrapping
        assert f"error in {row['trial']}: FileNotFoundError: data.val: {empty_val}: holds no readable images" in output
    assert output.index("status") < output.index("[tune] sweep 'all-failed' failed: all 1 trial(s) errored")
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FAILED" and parent.data.metrics["tune/errors"] == 1
    assert {run.info.status for run in child_runs(client, parent.info.run_id).values()} == {"FAILED"}

    # One trial of two fails: the best of the other is reported, and the command still exits 1.
    code, summary, output = sweep("some-failed", f"  data.val: {{grid: ['{demo_data / 'val'}', '{empty_val}']}}\n")
    assert code == 1
    statuses = {row["params"]["data.val"]: row["status"] for row in summary["trials"]}
    assert statuses == {str(demo_data / "val"): "finished", str(empty_val): "error"}, statuses
    assert summary["best"]["params"]["data.val"] == str(demo_data / "val")
    assert summary["failure"].startswith("1 of 2 trial(s) errored")
    assert output.index("best trial") < output.index("[tune] sweep 'some-failed' failed: 1 of 2 trial(s) errored")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["tune/errors"] == 1
    assert "s3cret-pw" not in output and "gan:***@" in output
    # Nor does any file the sweep stored (Tune's experiment state, Train's run folders, the trials' results).
    stored = [path for path in (tmp_path / "runs").rglob("*") if path.is_file() and b"s3cret-pw" in path.read_bytes()]
    assert not stored, stored


BAD_SPACES = {
    "unknown key": ("param_space:\n  optim.glr: {loguniform: [1.0e-4, 1.0e-3]}\n",
                    ["param_space.optim.glr", "not a config key", "did you mean optim.g_lr"]),
    "loguniform bound": ("param_space:\n  optim.g_lr: {loguniform: [0, 1.0e-3]}\n",
                         ["param_space.optim.g_lr", "loguniform needs 0 < lo < hi"]),
    "reversed uniform": ("param_space:\n  generator.res_scale: {uniform: [0.5, 0.1]}\n",
                         ["param_space.generator.res_scale", "uniform needs lo < hi"]),
    "bound outside the schema": ("param_space:\n  generator.res_scale: {uniform: [0.1, 1.5]}\n",
                                 ["generator.res_scale=1.5", "less than or equal to 1"]),
    "uniform on an integer key": ("param_space:\n  schedule.warmup_steps: {uniform: [0, 10]}\n",
                                  ["schedule.warmup_steps is an integer key", "use {randint: [0, 10]}"]),
    "loguniform mutation on an integer key": (
        ("scheduler:\n  name: pbt\n  perturbation_interval: 2\n  hyperparam_mutations:\n"
         "    schedule.warmup_steps: {loguniform: [1, 100]}\n"),
        ["scheduler.pbt.hyperparam_mutations", "schedule.warmup_steps is an integer key", "randint"]),
    "bad choice value": ("param_space:\n  schedule.lr_schedule: {choice: [cosine, cosinus]}\n",
                         ["schedule.lr_schedule='cosinus'"]),
    "unknown scheduler setting": (
        ("scheduler: {name: asha, grace_period: 2, grace: 3}\n"
         "param_space:\n  optim.g_lr: {choice: [1.0e-4]}\n"),
        ["scheduler.asha.grace", "unknown key"]),
    "pbt interval off checkpoints": (
        ("scheduler:\n  name: pbt\n  perturbation_interval: 3\n  hyperparam_mutations:\n"
         "    optim.g_lr: {loguniform: [1.0e-5, 1.0e-3]}\n"),
        ["perturbation_interval (3) must be a multiple of train.ckpt_every (2)"]),
}


@pytest.mark.parametrize("problem", sorted(BAD_SPACES))
def test_bad_space_fails_before_any_trial_starts(problem, tmp_path):
    body, expected = BAD_SPACES[problem]
    space = write_space(tmp_path, "bad", body)
    storage = tmp_path / "runs"
    with pytest.raises(ConfigError) as raised:
        tune.main(["--space", space, "--name", "bad", "--tracking-uri", "http://127.0.0.1:9",  # nothing listens
                   *tiny_overrides(tmp_path / "no-data", storage, steps=4)])
    for text in expected:
        assert text in str(raised.value), str(raised.value)
    assert not storage.exists(), "no trial may start"


def test_missing_data_fails_before_any_trial_starts(tmp_path):
    from jobs.cli import JobError

    storage = tmp_path / "runs"
    with pytest.raises(JobError, match="data.train=.*no-data.*does not exist"):
        tune.main(["--space", str(REPO / "tune_spaces" / "demo_asha.yaml"), "--name", "nodata",
                   "--tracking-uri", "http://127.0.0.1:9", *tiny_overrides(tmp_path / "no-data", storage, steps=240)])
    assert not storage.exists(), "no trial may start"
