"""gan_core.checkpoint: training checkpoints (exact resume, RNG included), sampler states, generator files
(every generator option survives), load_generator on our files and BasicSR's, and which checkpoint folders
are complete (manifests, folders written before them, the newest complete one of a run)."""

import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from gan_core.build import build_state
from gan_core.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_config,
    export_generator,
    load_checkpoint,
    load_generator,
    load_sampler_state,
    read_checkpoint,
    save_checkpoint,
    save_generator,
    save_sampler_state,
)
from gan_core.manifest import (
    MANIFEST_FILE,
    RAY_SNAPSHOT_FILE,
    IncompleteCheckpointWarning,
    checkpoint_problem,
    is_checkpoint_folder,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    write_manifest,
)
from gan_core.models import RRDBNet, build_generator, generator_config, rrdb_tiny
from gan_core.step import train_step
from tests.gan_core.conftest import batches, tiny_config


def _losses(history):
    return [{k: float(v) for k, v in h.items()} for h in history]


def _train_after_restore(tmp_path, cfg, restore_rng_state=True):
    """(losses of 3 steps right after saving, losses of the same 3 steps after restoring into a fresh state)."""
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    data = batches(cfg)
    for _ in range(3):
        train_step(state, data, cfg)
    save_checkpoint(tmp_path, state, cfg, extra={"note": "hello"})
    # The data position is the caller's business (the sampler has its own state); replay the same batches.
    after = [next(data) for _ in range(3)]
    expected = _losses([train_step(state, iter(after), cfg) for _ in range(3)])
    torch.manual_seed(999)  # the RNG state must come from the checkpoint, not from here
    fresh = build_state(cfg, torch.device("cpu"))
    extra = load_checkpoint(tmp_path, fresh, restore_rng_state=restore_rng_state)
    assert extra == {"note": "hello"} and fresh.step == 3
    return expected, _losses([train_step(fresh, iter(after), cfg) for _ in range(3)])


# WGAN-GP draws a random interpolation weight per sample in every D step: the losses after a restore
# depend on the RNG state that the checkpoint carries.
GP_CONFIG = {"loss": {"adversarial": "wgan", "adversarial_weight": 0.1, "gp_weight": 10.0},
             "schedule": {"lr_schedule": "cosine"}, "train": {"total_steps": 8, "pretrain_steps": 2}}


def test_round_trip_restores_identical_training(tmp_path):
    expected, got = _train_after_restore(tmp_path, tiny_config(**GP_CONFIG))
    assert "d/gp" in got[0]
    for want, have in zip(expected, got, strict=True):
        assert have == want  # bit for bit: same weights, optimizer moments, schedule and RNG


def test_round_trip_depends_on_the_restored_rng(tmp_path):
    # The check above would pass with a no-op RNG restore if the steps drew no random numbers: they do.
    expected, got = _train_after_restore(tmp_path, tiny_config(**GP_CONFIG), restore_rng_state=False)
    assert got[0]["d/gp"] != expected[0]["d/gp"]


def test_checkpoint_is_self_describing_and_weights_only(tmp_path):
    cfg = tiny_config()
    state = build_state(cfg, torch.device("cpu"))
    path = save_checkpoint(tmp_path / "ckpt", state, cfg)
    assert path.name == CHECKPOINT_FILE
    payload = torch.load(path, weights_only=True)  # no pickled code inside
    assert checkpoint_config(payload) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config()
    state = build_state(cfg, torch.device("cpu"))
    save_checkpoint(tmp_path, state, cfg)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    state.step = 5

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state, cfg)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_FILE]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a gan_core/1 checkpoint"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing")


def test_sampler_state_per_worker(tmp_path):
    save_sampler_state(tmp_path, 1, {"epoch": 3, "position": 7})
    assert load_sampler_state(tmp_path, 1) == {"epoch": 3, "position": 7}
    assert load_sampler_state(tmp_path, 0) is None


def test_export_generator_prefers_ema_and_loads(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    train_step(state, batches(cfg), cfg)
    save_checkpoint(tmp_path, state, cfg)
    slim = export_generator(tmp_path, tmp_path / "g.pt")
    assert slim.stat().st_size < (tmp_path / CHECKPOINT_FILE).stat().st_size
    generator = load_generator(slim)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(generator(x), state.generator_ema(x))
    with pytest.raises(ValueError, match="generator file, not a training checkpoint"):
        load_checkpoint(slim, state)


@pytest.mark.parametrize("options", [{"res_scale": 0.3}, {"upsample_skip": "bicubic"}, {"scale": 2, "num_grow_ch": 4}])
def test_generator_file_keeps_every_option(tmp_path, options):
    torch.manual_seed(0)
    generator = build_generator(**{"name": "rrdb", "num_feat": 8, "num_block": 1, "num_grow_ch": 8, **options})
    torch.nn.init.normal_(generator.conv_last.weight, std=0.01)
    loaded = load_generator(save_generator(tmp_path / "g.pt", generator, step=5))
    assert generator_config(loaded) == generator_config(generator)
    assert read_checkpoint(tmp_path / "g.pt")["step"] == 5
    _assert_same_outputs(loaded, generator)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


# --- load_generator: BasicSR files, training checkpoints, bad files ----------------


def _save(obj, path):
    torch.save(obj, path)
    return path


def _assert_same_outputs(loaded, reference):
    assert not loaded.training
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference.eval()(x))


@pytest.mark.parametrize("layout", ["params_ema", "params", "plain", "ddp_prefix", "compile_prefix", "both_prefixes"])
def test_load_basicsr_format(tmp_path, layout):
    torch.manual_seed(0)
    reference = RRDBNet(num_feat=16, num_block=3, num_grow_ch=8, scale=2)
    state = reference.state_dict()
    obj = {
        "params_ema": {"params_ema": state},
        "params": {"params": state},
        "plain": state,
        "ddp_prefix": {"params": {f"module.{k}": v for k, v in state.items()}},
        "compile_prefix": {f"_orig_mod.{k}": v for k, v in state.items()},
        "both_prefixes": {"params_ema": {f"_orig_mod.module.{k}": v for k, v in state.items()}},
    }[layout]
    loaded = load_generator(_save(obj, tmp_path / "net_g.pth"), arch="basicsr")
    assert isinstance(loaded, RRDBNet)
    assert (loaded.scale, loaded.conv_first.out_channels, len(loaded.body)) == (2, 16, 3)
    assert loaded.body[0].rdb1.conv1.out_channels == 8
    _assert_same_outputs(loaded, reference)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_load_basicsr_infers_scale(tmp_path, scale):
    reference = rrdb_tiny(scale=scale)
    loaded = load_generator(_save(reference.state_dict(), tmp_path / "g.pth"), arch="basicsr")
    assert loaded.scale == scale
    _assert_same_outputs(loaded, reference)


def test_load_basicsr_prefers_params_ema(tmp_path):
    torch.manual_seed(0)
    ema, raw = rrdb_tiny(), rrdb_tiny()
    path = _save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, tmp_path / "g.pth")
    _assert_same_outputs(load_generator(path, arch="basicsr"), ema)
    _assert_same_outputs(load_generator(path, use_ema=False, arch="basicsr"), raw)


def test_load_training_checkpoint_prefers_ema(tmp_path):
    cfg = tiny_config(generator={"res_scale": 0.3})
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    train_step(state, batches(cfg), cfg)  # EMA and raw weights now differ
    save_checkpoint(tmp_path, state, cfg)
    from_dir = load_generator(tmp_path)
    assert from_dir.res_scale == 0.3 and from_dir.body[0].rdb2.res_scale == 0.3
    _assert_same_outputs(from_dir, state.generator_ema)
    _assert_same_outputs(load_generator(tmp_path / CHECKPOINT_FILE), state.generator_ema)
    _assert_same_outputs(load_generator(tmp_path, use_ema=False), state.generator)


def test_load_training_checkpoint_without_ema_uses_generator(tmp_path):
    cfg = tiny_config(train={"ema_decay": 0})
    state = build_state(cfg, torch.device("cpu"))
    _assert_same_outputs(load_generator(save_checkpoint(tmp_path, state, cfg)), state.generator)


class _NotAllowed:
    pass


def test_load_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'optimizer'.*expected.*params_ema"):
        load_generator(_save({"optimizer": {}, "epoch": 3}, tmp_path / "a.pth"))
    with pytest.raises(ValueError, match="not a torch.save file"):
        (tmp_path / "b.pth").write_text("hello")
        load_generator(tmp_path / "b.pth")
    # A Ray run folder's JSON snapshot picked by a glob: named as what it is, not as an unpickling failure.
    (tmp_path / "checkpoint_manager_snapshot.json").write_text('{"checkpoints": []}')
    with pytest.raises(ValueError, match=r"snapshot.json is not a torch.save file \(it starts with b'\{\"ch'\)"):
        load_generator(tmp_path / "checkpoint_manager_snapshot.json")
    with pytest.raises(ValueError, match="'other/9' is not supported"):
        load_generator(_save({"format": "other/9"}, tmp_path / "c.pt"))
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_generator(_save({"params": _NotAllowed()}, tmp_path / "d.pth"))
    with pytest.raises(ValueError, match="conv_first has 5 input channels"):
        state = rrdb_tiny().state_dict()
        state["conv_first.weight"] = torch.zeros(16, 5, 3, 3)
        load_generator(_save(state, tmp_path / "e.pth"))
    with pytest.raises(ValueError, match="do not match RRDBNet"):
        state = rrdb_tiny().state_dict()
        del state["body.0.rdb2.conv3.bias"]
        load_generator(_save(state, tmp_path / "f.pth"), arch="basicsr")
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing")


# --- complete checkpoints: manifests, folders written before them, the newest complete one -------------


@pytest.fixture(scope="module")
def complete_folder(tmp_path_factory):
    """A checkpoint folder as one worker's checkpoint hook leaves it: checkpoint.pt, sampler, manifest."""
    cfg = tiny_config()
    directory = tmp_path_factory.mktemp("complete")
    files = [save_checkpoint(directory, build_state(cfg, torch.device("cpu")), cfg),
             save_sampler_state(directory, 0, {"epoch": 1, "position": 4})]
    write_manifest(directory, files)
    return directory


def _copy(source, target):
    shutil.copytree(source, target)
    return target


def test_manifest_lists_sizes_and_hashes(complete_folder):
    manifest = json.loads((complete_folder / MANIFEST_FILE).read_text())
    checkpoint = complete_folder / CHECKPOINT_FILE
    assert manifest["world_size"] == 1 and manifest["rank"] == 0
    assert manifest["files"][CHECKPOINT_FILE] == {"bytes": checkpoint.stat().st_size,
                                                  "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert is_complete_checkpoint(complete_folder) and checkpoint_problem(complete_folder) is None
    assert is_checkpoint_folder(complete_folder) and not is_checkpoint_folder(complete_folder.parent)


def _truncate(folder):
    (folder / CHECKPOINT_FILE).write_bytes((folder / CHECKPOINT_FILE).read_bytes()[:10])


def _flip_a_byte(folder):
    data = bytearray((folder / CHECKPOINT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / CHECKPOINT_FILE).write_bytes(bytes(data))


def _rewrite_manifest(change):
    def damage(folder):
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        change(manifest)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return damage


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda folder: (folder / "sampler_rank0.pt").unlink(), r"sampler_rank0.pt is missing \(manifest.json lists it\)"),
    (lambda folder: (folder / "sampler_rank0.pt").write_bytes(b""), r"sampler_rank0.pt has 0 bytes, manifest.json says \d+"),
    (_truncate, r"checkpoint.pt has 10 bytes, manifest.json says \d+"),
    (_flip_a_byte, "checkpoint.pt does not match its SHA-256 in manifest.json"),
    (lambda folder: (folder / MANIFEST_FILE).write_text('{"format": "gan_core/manifest/1", "fil'),
     "manifest.json is not valid JSON"),
    (lambda folder: (folder / MANIFEST_FILE).write_bytes(b""), "manifest.json is not valid JSON"),
    (lambda folder: (folder / MANIFEST_FILE).rename(folder / "manifest_rank1.json"), "manifest.json is missing"),
    (_rewrite_manifest(lambda m: m.update(world_size=3)),
     r"manifest_rank1.json is missing \(worker 1's .*; manifest_rank2.json is missing"),
    (_rewrite_manifest(lambda m: m["files"].pop(CHECKPOINT_FILE)), "manifest.json lists no checkpoint.pt"),
    (_rewrite_manifest(lambda m: m["files"].update({"../checkpoint.pt": m["files"][CHECKPOINT_FILE]})),
     "manifest.json is malformed"),
    (_rewrite_manifest(lambda m: m.update(format="other/1")), "not a gan_core/manifest/1 manifest"),
])
def test_damaged_folder_is_incomplete_with_a_reason(complete_folder, tmp_path, damage, reason):
    folder = _copy(complete_folder, tmp_path / "checkpoint_000001")
    damage(folder)
    assert not is_complete_checkpoint(folder)
    assert re.search(reason, checkpoint_problem(folder))


def test_folder_without_manifest_is_complete_when_it_loads(complete_folder, tmp_path):
    # Checkpoints written before manifests existed stay usable; a cut-off one does not.
    old = _copy(complete_folder, tmp_path / "old")
    (old / MANIFEST_FILE).unlink()
    assert checkpoint_problem(old) is None
    generator_only = tmp_path / "generator_only"
    save_generator(generator_only / CHECKPOINT_FILE, rrdb_tiny())
    assert checkpoint_problem(generator_only) is None
    _truncate(old)
    assert checkpoint_problem(old).startswith("checkpoint.pt does not load (RuntimeError: ")
    (old / CHECKPOINT_FILE).write_bytes(b"")
    assert checkpoint_problem(old) == "checkpoint.pt is empty (0 bytes)"
    (old / CHECKPOINT_FILE).unlink()
    assert checkpoint_problem(old) == "no checkpoint.pt (and no manifest.json)"


def test_write_manifest_refuses_files_of_other_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not directly inside"):
        write_manifest(tmp_path / "a", [tmp_path / "b.pt"])
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        write_manifest(tmp_path, [], rank=2, world_size=2)


def _run_folder(complete_folder, root, names):
    for name in names:
        _copy(complete_folder, root / name)
    return root


def test_latest_complete_checkpoint_skips_newer_broken_folders(complete_folder, tmp_path):
    run = _run_folder(complete_folder, tmp_path / "run", ["checkpoint_8", "checkpoint_9", "checkpoint_10",
                                                          "checkpoint_11"])
    _truncate(run / "checkpoint_11")
    (run / "checkpoint_10" / "sampler_rank0.pt").write_bytes(b"")
    with pytest.warns(IncompleteCheckpointWarning) as caught:
        assert latest_complete_checkpoint(run) == run / "checkpoint_9"  # by number: 9 < 10 < 11
    lines = [str(w.message) for w in caught]
    assert len(lines) == 2 and "checkpoint_11 (checkpoint.pt has 10 bytes" in lines[0]
    assert "checkpoint_10 (sampler_rank0.pt has 0 bytes" in lines[1] and lines[1].endswith(f"using {run / 'checkpoint_9'}")
    said = []
    assert latest_complete_checkpoint(run, warn=said.append) == run / "checkpoint_9" and len(said) == 2


def test_latest_complete_checkpoint_orders_ray_dates_and_searches_below(complete_folder, tmp_path):
    # Ray 2.60 names checkpoints by date; the folder given may be the storage folder above the run.
    names = ["checkpoint_2026-11-30_09-59-58.123456", "checkpoint_2026-11-30_10-00-01.000001"]
    run = _run_folder(complete_folder, tmp_path / "storage" / "demo", names)
    assert latest_complete_checkpoint(tmp_path / "storage") == run / names[1]


def _ray_snapshot(run, names):
    """What Ray Train 2.60's checkpoint manager writes after each report (the fields we read)."""
    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {}} for name in names]
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(names), "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))


def test_latest_complete_checkpoint_prefers_what_ray_lists(complete_folder, tmp_path):
    run = _run_folder(complete_folder, tmp_path / "run", ["checkpoint_000001", "checkpoint_000002",
                                                          "checkpoint_000003"])
    _ray_snapshot(run, ["checkpoint_000001", "checkpoint_000002"])  # the report of 3 never finished
    said = []
    assert latest_complete_checkpoint(run, warn=said.append) == run / "checkpoint_000002"
    assert said == [(f"skipping checkpoint {run / 'checkpoint_000003'}, which {RAY_SNAPSHOT_FILE} does not list "
                     f"(complete, but its report to Ray Train did not finish); using {run / 'checkpoint_000002'}")]
    # Listed is not trusted blindly; when nothing listed is complete, any complete folder will do.
    _flip_a_byte(run / "checkpoint_000002")
    (run / "checkpoint_000001" / CHECKPOINT_FILE).unlink()
    said.clear()
    assert latest_complete_checkpoint(run, warn=said.append) == run / "checkpoint_000003"
    assert [line.split(" (")[0] for line in said] == [f"skipping incomplete checkpoint {run / 'checkpoint_000002'}",
                                                      f"skipping incomplete checkpoint {run / 'checkpoint_000001'}"]
    # Ray rewrites its snapshot in place: a cut-off one is ignored, with a line saying so.
    (run / RAY_SNAPSHOT_FILE).write_text('{"ray_version": "2.6')
    said.clear()
    assert latest_complete_checkpoint(run, warn=said.append) == run / "checkpoint_000003"
    assert said[0].startswith(f"ignoring {run / RAY_SNAPSHOT_FILE}, which does not parse")


def test_latest_complete_checkpoint_raises_when_none_is_complete(complete_folder, tmp_path):
    (tmp_path / "checkpoint_000009").mkdir()  # what Ray's copy leaves when it dies before the first file
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.pt"):
        latest_complete_checkpoint(tmp_path)
    run = _run_folder(complete_folder, tmp_path / "run", ["checkpoint_000001", "checkpoint_000002"])
    _truncate(run / "checkpoint_000001")
    (run / "checkpoint_000002" / MANIFEST_FILE).write_text("")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint under .*\(checkpoint_000002: manifest.json "
                                                r"is not valid JSON .*; checkpoint_000001: checkpoint.pt has 10 bytes"):
        latest_complete_checkpoint(run)
