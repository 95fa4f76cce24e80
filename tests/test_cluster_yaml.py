"""cluster.yaml validates against the JSON schema that Ray ships for cluster launcher configs, and its MLflow
server requires a login whose credentials never sit in the repository."""

import json
import re
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
    # A team's MLflow: PostgreSQL (concurrent writers), artifacts on S3; SQLite stays the laptop default only.
    assert "--backend-store-uri postgresql://" in head_setup and "--artifacts-destination s3://" in head_setup
    assert "psycopg2-binary" in head_setup and "install -y -q postgresql" in head_setup
    assert config["provider"]["use_internal_ips"] is True


CREDENTIALS = "$HOME/.gan-enhance/mlflow-auth.env"


def test_mlflow_server_requires_a_login_with_credentials_from_outside_the_repo():
    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    (server,) = [command for command in config["head_setup_commands"] if "mlflow server" in command]
    assert "--app-name basic-auth" in server
    # The admin user is made from the operator's credentials file, sourced into the server's environment.
    assert server.index(f". {CREDENTIALS}") < server.index("mlflow server")
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD" in server and "MLFLOW_AUTH_CONFIG_PATH=" in server
    assert any('"mlflow[auth]"' in command for command in config["head_setup_commands"])  # Flask-WTF
    # The file comes from the operator's machine, outside the synced repository, to every node ...
    assert config["file_mounts"]["/home/ubuntu/.gan-enhance/mlflow-auth.env"] == "~/.gan-enhance/mlflow-auth.env"
    # ... and Ray runs with it in its environment on the head and the workers, so jobs and workers log in.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [command for command in commands if "ray start" in command]
        assert start.index(f". {CREDENTIALS}") < start.index("ray start")
    # No password in the file itself, and none in a tracking URI.
    assert not re.search(r"(PASSWORD|admin_password)\s*=\s*[^$<\s]", text), "a literal password in cluster.yaml"
    assert not re.search(r"https?://[^/\s]*:[^/\s]*@", text), "credentials in a URI"
