"""A downloaded MLflow model names its generator file in its MLmodel YAML; that path comes from the tracking
server and must not lead a job to read outside the downloaded folder (`../../etc/passwd`, an absolute path,
a link pointing out)."""

import pytest
import yaml

from jobs.cli import JobError
from jobs.tracking.model_source import generator_artifact

URI = "models:/sr@champion"


def _model(folder, artifact_path, flavors=None):
    """A downloaded pyfunc model folder: MLmodel plus artifacts/generator.pt."""
    (folder / "artifacts").mkdir(parents=True)
    (folder / "artifacts" / "generator.pt").write_bytes(b"weights")
    generator = {"path": artifact_path, "uri": "/somewhere/generator.pt"}
    flavors = flavors if flavors is not None else {"python_function": {"artifacts": {"generator": generator},
                                                                       "python_model": "python_model.pkl"}}
    (folder / "MLmodel").write_text(yaml.safe_dump({"artifact_path": "generator", "flavors": flavors}))
    return folder


def test_artifact_inside_the_model_folder_is_used(tmp_path):
    model = _model(tmp_path / "model", "artifacts/generator.pt")
    assert generator_artifact(model, URI) == (model / "artifacts" / "generator.pt").resolve()
    assert generator_artifact(_model(tmp_path / "dots", "artifacts/../artifacts/generator.pt"), URI).is_file()


@pytest.mark.parametrize("artifact_path", ["../../etc/passwd", "/etc/passwd", "../model-evil/generator.pt"])
def test_artifact_path_leading_outside_is_refused(tmp_path, artifact_path):
    evil = tmp_path / "model-evil"  # a sibling whose name starts like the model folder's
    evil.mkdir()
    (evil / "generator.pt").write_bytes(b"not yours")
    model = _model(tmp_path / "model", artifact_path)
    with pytest.raises(JobError, match=r"leads outside the downloaded model .*refusing to read it"):
        generator_artifact(model, URI)


def test_link_pointing_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not yours")
    model = _model(tmp_path / "model", "artifacts/link.pt")
    (model / "artifacts" / "link.pt").symlink_to(secret)
    with pytest.raises(JobError, match="leads outside the downloaded model"):
        generator_artifact(model, URI)


@pytest.mark.parametrize("flavors", [{}, {"python_function": "text"}, {"python_function": {"artifacts": {
    "generator": {"path": ["a", "list"]}}}}])
def test_malformed_mlmodel_is_a_clear_error(tmp_path, flavors):
    with pytest.raises(JobError, match="has no `generator` artifact"):
        generator_artifact(_model(tmp_path / "model", "unused", flavors=flavors), URI)
    (tmp_path / "model" / "MLmodel").write_text("flavors: [unclosed")
    with pytest.raises(JobError, match="not valid YAML"):
        generator_artifact(tmp_path / "model", URI)
