"""cluster.yaml validates against the JSON schema that Ray ships for cluster launcher configs."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)


def test_cluster_yaml_has_gpu_workers_mlflow_and_private_binding():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] <= workers["max_workers"] <= config["max_workers"]
    head_setup = " ".join(config["head_setup_commands"])
    assert "mlflow server" in head_setup and "--backend-store-uri" in head_setup and "0.0.0.0" not in head_setup
    assert config["provider"]["use_internal_ips"] is True
