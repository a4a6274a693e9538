"""Damaged data is reported for what it cost: truncated, missing and mismatching shards counted
as samples lost per shard, the `data.on_damage` policy, top-up repeats, the per-rank counts
gathered for MLflow, and `data verify` flagging pickle members and samples the stream skips.
Real WebDataset tar shards in tmp_path throughout."""

import hashlib
import io
import json
import tarfile

import pytest
from typer.testing import CliRunner
from webdataset import autodecode

import ssl_dist.data.stream as stream_mod
from ssl_dist.config import ConfigError, DataConfig, load_config
from ssl_dist.data.damage import EpochDamage
from ssl_dist.data.shards import verify
from ssl_dist.data.stream import stream

PICKLE = b"\x80\x04K\x01."  # pickle.dumps(1): never loaded here, only written into a shard


def _cfg(out, **kw) -> DataConfig:
    base = dict(manifest=str(out / "manifest.json"), batch_size=8, image_size=8, shuffle_buffer=0)
    return DataConfig(**(base | kw))


def _skip(**kw):
    return {"on_damage": {"shard": "skip", "sample": "skip"}} | kw


def _truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _rewrite(path, change):
    """Rewrite a shard's members through `change(name, data) -> [(name, data), ...]`."""
    with tarfile.open(path) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for name, data in members:
            for new_name, new_data in change(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                dst.addfile(info, io.BytesIO(new_data))


def _record_in_manifest(out, name):
    """Make the manifest describe the shard as it is now (a producer that wrote it so)."""
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    data = (out / name).read_bytes()
    for split in doc["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(doc))


@pytest.mark.unit
def test_truncated_shard_counts_lost_samples_per_shard_and_tops_up(make_shards):
    out, _ = make_shards(40, 10)  # 4 shards of 10; 5 batches of 8 need all 40 samples
    _truncate(out / "train-000001.tar")
    s = stream(_cfg(out, **_skip()), 0, 1, 0)
    labels = [int(v) for b in s for v in b.labels]
    report = s.stats.shards["train-000001.tar"]
    assert report.read is not None and 3 <= report.read <= 7  # about half of 10
    assert report.lost == 10 - report.read == s.stats.lost
    assert any("size" in p for p in report.problems)
    assert s.stats.report() == [report.line()]
    assert report.line().startswith(f"train-000001.tar: {report.lost} of 10 samples lost")
    # A broken shard is not "skipped samples": those are samples found that do not decode.
    assert s.stats.skipped == len(report.skipped)
    # The rank still ran its 5 batches, topping up with samples read a second time.
    good = 30 + report.read - len(report.skipped)
    assert s.stats.batches == 5 and len(labels) == 40
    assert s.stats.topups == 1 and s.stats.repeats == 40 - good
    assert len(set(labels)) == good


@pytest.mark.unit
def test_truncated_shard_fails_before_the_first_batch_by_default(make_shards):
    out, _ = make_shards(40, 10)
    _truncate(out / "train-000002.tar")
    s = stream(_cfg(out), 0, 1, 0)
    with pytest.raises(RuntimeError, match=r"train-000002\.tar: size \d+ bytes") as e:
        next(iter(s))
    assert type(e.value).__name__ == "DamagedDataError"
    assert "data.on_damage.shard=skip" in str(e.value)
    assert s.stats.batches == 0


@pytest.mark.unit
def test_missing_shard(make_shards):
    out, _ = make_shards(30, 10)
    (out / "train-000001.tar").unlink()
    with pytest.raises(RuntimeError, match=r"train-000001\.tar: missing"):
        next(iter(stream(_cfg(out), 0, 1, 0)))
    s = stream(_cfg(out, **_skip(batch_size=5)), 0, 1, 0)
    assert len([b for b in s]) == 6
    report = s.stats.shards["train-000001.tar"]
    assert report.read == 0 and report.lost == 10 == s.stats.lost
    assert "missing" in report.problems
    assert s.stats.repeats == 10


@pytest.mark.unit
def test_checksum_mismatch_found_with_verify_checksums(make_shards):
    out, _ = make_shards(20, 10)
    path = out / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the tar's end padding: same size, every sample still reads
    path.write_bytes(bytes(data))
    s = stream(_cfg(out, batch_size=5), 0, 1, 0)
    assert len(list(s)) == 4 and s.stats.shards == {}  # sizes alone cannot tell
    with pytest.raises(RuntimeError, match=r"train-000000\.tar: sha256 does not match"):
        next(iter(stream(_cfg(out, batch_size=5, verify_checksums=True), 0, 1, 0)))
    s = stream(_cfg(out, batch_size=5, verify_checksums=True, **_skip()), 0, 1, 0)
    assert len(list(s)) == 4
    assert s.stats.report() == ["train-000000.tar: sha256 does not match the manifest"]
    assert s.stats.lost == 0


@pytest.mark.unit
def test_undecodable_sample_skipped_by_default_fails_when_asked(make_shards):
    out, _ = make_shards(20, 10)  # 4 batches of 5 need all 20
    bad = {"train0000003.png", "train0000014.png"}
    for name in ("train-000000.tar", "train-000001.tar"):
        _rewrite(out / name, lambda n, d: [(n, b"not a png" if n in bad else d)])
        _record_in_manifest(out, name)
    s = stream(_cfg(out, batch_size=5), 0, 1, 0)
    labels = [int(v) for b in s for v in b.labels]
    assert s.stats.skipped == 2 and s.stats.lost == 0
    assert s.stats.shards["train-000000.tar"].skipped == {"train0000003"}
    assert s.stats.topups == 1 and s.stats.repeats == 2 and len(labels) == 20
    assert not {3, 14} & set(labels)
    with pytest.raises(RuntimeError, match=r"sample train0000003 of shard train-000000\.tar"):
        list(stream(_cfg(out, batch_size=5, on_damage={"sample": "fail"}), 0, 1, 0))


@pytest.mark.unit
def test_counts_gathered_for_mlflow(make_shards):
    """The rows each rank sends at the end of an epoch, as rank 0 reads them."""
    import torch

    out, manifest = make_shards(40, 10)
    _truncate(out / "train-000003.tar")
    names = [s.name for s in manifest.splits["train"].shards]
    cfg = _cfg(out, **_skip(batch_size=4))
    ranks = [stream(cfg, r, 2, 0) for r in range(2)]
    for s in ranks:
        list(s)
    damage = EpochDamage.from_rows(torch.stack([s.stats.row(names) for s in ranks]), names)
    hit = next(r for r, s in enumerate(ranks) if s.stats.shards)
    lost = ranks[hit].stats.lost
    assert lost > 0 and damage.damaged == ["train-000003.tar"]
    metrics = damage.metrics()
    assert metrics["data/samples_lost"] == lost == metrics[f"data/rank{hit}/samples_lost"]
    assert metrics[f"data/rank{1 - hit}/samples_lost"] == 0
    assert metrics["data/topup_repeats"] == sum(s.stats.repeats for s in ranks)
    assert metrics["data/shards_damaged"] == 1
    assert damage.lines()[0] == (
        f"train-000003.tar: {lost} samples lost, 0 skipped (rank {hit}) [damaged]"
    )


@pytest.mark.unit
def test_data_stream_command_reports_damage(make_shards):
    from ssl_dist.cli import app

    out, _ = make_shards(40, 10)
    _truncate(out / "train-000001.tar")
    manifest = f"data.manifest={out}/manifest.json"
    args = ["data", "stream", "-o", manifest, "-o", "data.batch_size=8", "-o", "data.image_size=8"]
    r = CliRunner().invoke(app, [*args, "-o", "data.on_damage.shard=skip"])
    assert r.exit_code == 0, r.output
    assert "lost, " in r.output and "top-up repeats" in r.output
    assert "damaged train-000001.tar: " in r.output
    r = CliRunner().invoke(app, args)
    assert type(r.exception).__name__ == "DamagedDataError"  # main() exits 1 on it


@pytest.mark.unit
def test_on_damage_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"data\.on_damage\.shard=skip"):
        load_config(None, ["data.on_damage=skip"])
    assert load_config(None, ["data.on_damage.shard=skip"]).data.on_damage.sample == "skip"


def _unpickling_exts() -> list[str]:
    """webdataset's decoders that unpickle (pickle.loads, torch.load), read from its table."""
    out = []
    for ext, fn in autodecode.decoders.items():
        code = getattr(fn, "__code__", None)
        if fn is autodecode.unpickle_loads or (code and "torch_loads" in code.co_names):
            out.append(ext)
    assert {"pyd", "pickle", "pkl", "pth"} <= set(out), out
    return out


@pytest.mark.unit
@pytest.mark.parametrize("ext", [*_unpickling_exts(), "pt", "pyd.gz", "seg.PKL"])
def test_verify_flags_members_whose_decoder_unpickles(make_shards, ext):
    out, _ = make_shards(10, 10)
    name = "train-000000.tar"
    member = f"train0000004.{ext}"

    def add(n, d):
        return [(n, d), (member, PICKLE)] if n == "train0000004.png" else [(n, d)]

    _rewrite(out / name, add)
    _record_in_manifest(out, name)
    problems = verify(out)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: member {member}: its decoder would unpickle it")
    with pytest.raises(stream_mod.UnsafeDataError, match="pickle"):
        list(stream(_cfg(out), 0, 1, 0))  # what verify flags is what the stream refuses


@pytest.mark.unit
def test_verify_flags_what_the_stream_would_skip_one_line_each(make_shards):
    from ssl_dist.cli import app

    out, _ = make_shards(10, 10)
    name = "train-000000.tar"
    gone = {"train0000002.cls", "train0000005.png"}
    _rewrite(out / name, lambda n, d: [] if n in gone else [(n, d)])
    _record_in_manifest(out, name)
    assert verify(out) == [
        f"{name}: sample train0000002: no class (.cls); the stream skips it",
        f"{name}: sample train0000005: no image (png, jpg, jpeg, webp, bmp, ppm, pgm); "
        "the stream skips it",
    ]
    r = CliRunner().invoke(app, ["data", "verify", str(out)])
    assert r.exit_code == 1
    assert r.output.count("BAD train-000000.tar: sample") == 2


@pytest.mark.slow  # imports the worker loop (Ray, DeepSpeed) and MLflow: ~20 s
def test_epoch_counts_logged_to_mlflow_by_rank_zero(make_shards, tmp_path, capsys):
    """The worker loop's end-of-epoch report, in one process (the gather returns this rank's
    row): metrics, the damaged-shards tag, the report on stderr."""
    import torch

    from ssl_dist import tracking
    from ssl_dist.train import checkpoint as ckpt
    from ssl_dist.train.hooks import DataReport
    from ssl_dist.train.tracker import Tracker

    out, _ = make_shards(40, 10)
    _truncate(out / "train-000001.tar")
    uri = tracking.resolve_uri(None, str(tmp_path / "runs"))
    overrides = [f"data.manifest={out}/manifest.json", "data.batch_size=8", "data.image_size=8"]
    overrides += ["data.on_damage.shard=skip", f"run.storage_path={tmp_path}/runs"]
    cfg = load_config(None, [*overrides, f"tracking.uri={uri}", "run.name=damage"])
    run_id = tracking.find_or_create_run(cfg, uri)
    shards = stream_mod.open_shards(cfg.data)
    state = ckpt.TrainState(world_size=1)
    tracker = Tracker(cfg, state, run_id, shards, None, torch.device("cpu"), 0, local_rank=1)
    report = DataReport(shards, tracker, torch.device("cpu"))
    report.current = data = stream(cfg.data, 0, 1, 0, shards=shards)
    list(data)
    state.step = 5
    report.after_epoch(state)
    assert tracker.logger is not None and tracker.logger.close(timeout_s=30)
    run = tracking.client(uri).get_run(run_id)
    lost = data.stats.lost
    assert lost > 0
    assert (
        run.data.metrics["data/samples_lost"] == lost == run.data.metrics["data/rank0/samples_lost"]
    )
    assert run.data.metrics["data/topup_repeats"] == data.stats.repeats > 0
    assert run.data.metrics["data/samples_skipped"] == 0
    assert run.data.tags["ssl_dist.damaged_shards"] == "train-000001.tar"
    assert f"step 5: train-000001.tar: {lost} samples lost" in capsys.readouterr().err
