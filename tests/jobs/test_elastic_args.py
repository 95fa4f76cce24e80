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
