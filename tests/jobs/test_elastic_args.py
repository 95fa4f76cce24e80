"""`jobs.train`'s multi-node and elastic flags, and what an elastic run refuses before it starts."""

from __future__ import annotations

import pytest

from gan_core.config import load_config
from jobs.cli import JobError
from jobs.train import parse_args
from jobs.training.trainer import elastic_loop_config
from tests.jobs.conftest import REPO

DEMO = str(REPO / "jobs/configs/demo.yaml")


def test_num_workers_fixed_or_range():
    assert parse_args(["--config", DEMO]).num_workers == 2
    assert parse_args(["--config", DEMO, "--num-workers", "3"]).num_workers == 3
    assert parse_args(["--config", DEMO, "--num-workers", "1-4"]).num_workers == (1, 4)


@pytest.mark.parametrize("value", ["0", "3-2", "0-2", "a", "1-", "-1"])
def test_bad_num_workers_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", DEMO, "--num-workers", value])
    assert exit_info.value.code == 2
    assert "--num-workers" in capsys.readouterr().err


def test_resources_per_worker_and_placement():
    args = parse_args(["--config", DEMO, "--resources-per-worker", '{"CPU": 1, "trainer": 1}',
                       "--placement-strategy", "SPREAD", "--resize-interval-s", "5"])
    assert args.resources_per_worker == {"CPU": 1, "trainer": 1}
    assert (args.placement_strategy, args.resize_interval_s) == ("SPREAD", 5.0)
    with pytest.raises(SystemExit):
        parse_args(["--config", DEMO, "--resources-per-worker", '["CPU"]'])


def test_elastic_global_batch_and_refusals():
    cfg = load_config(DEMO, ["data.batch_size=3"])
    assert elastic_loop_config(cfg, (1, 2)) == {"global_batch": 6}
    with pytest.raises(JobError, match="data.loader=memory"):
        elastic_loop_config(cfg.with_values({"data.loader": "stream", "data.sampling": "tile"}), (1, 2))


def test_tune_takes_elastic_trials_and_per_worker_resources(capsys):
    from jobs.tune import parse_args as tune_args

    args = tune_args(["--space", "s.yaml", "--workers-per-trial", "1-2", "--resources-per-worker", '{"trainer": 1}'])
    assert args.workers_per_trial == (1, 2) and args.resources_per_worker == {"trainer": 1}
    assert tune_args(["--space", "s.yaml"]).workers_per_trial == 2
    for bad in (["--workers-per-trial", "2-1"], ["--resources-per-worker", '{"CPU": 2}']):
        with pytest.raises(SystemExit) as exit_info:
            tune_args(["--space", "s.yaml", *bad])
        assert exit_info.value.code == 2
    assert "--cpus-per-worker" in capsys.readouterr().err


def test_elastic_trials_are_planned_with_their_largest_group_and_custom_resources(capsys):
    from jobs.sweeps.tuner import TrialResources, plan_concurrency

    elastic = TrialResources(workers=(1, 2), cpus_per_worker=1.0, worker_resources={"trainer": 1})
    assert elastic.demand() == {"CPU": 3.0, "GPU": 0.0, "trainer": 2.0}
    assert elastic.per_worker() == {"CPU": 1.0, "trainer": 1}
    # CPUs as planned (Ray Train would reserve none when a dict leaves them out)
    assert TrialResources(workers=2, worker_resources={"trainer": 1}).per_worker() == {"CPU": 1.0, "trainer": 1}
    assert TrialResources(workers=2).per_worker() is None
    # 9 CPUs hold (9 - 1) // 3 = 2 trials, the 2 trainer slots (one per node) only one
    assert plan_concurrency({"CPU": 9.0, "trainer": 2.0}, elastic, num_trials=4) == 1
    assert "1-2 workers" in capsys.readouterr().out
    with pytest.raises(JobError, match="0 trainer \\(a trial needs 2\\)"):
        plan_concurrency({"CPU": 9.0}, elastic, num_trials=4)


def test_resources_per_worker_keep_ray_trains_default_cpus():
    from jobs.cli import with_default_cpus

    assert with_default_cpus({"trainer": 1}, use_gpu=False) == {"CPU": 1.0, "trainer": 1}
    assert with_default_cpus({"trainer": 1}, use_gpu=True) == {"CPU": 0.0, "trainer": 1}
    assert with_default_cpus({"CPU": 2, "trainer": 1}, use_gpu=False) == {"CPU": 2, "trainer": 1}
    assert with_default_cpus(None, use_gpu=False) is None
