"""`data prepare --source imagefolder`: original bytes, a seeded order that mixes classes in
every shard, the same bytes with any number of writer processes, bad files skipped and named.
The folders come from :mod:`ssl_dist.data.synthetic` (digits on canvases of random size and
aspect, class-sorted on disk) or are written by hand."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_dist.config import ConfigError
from ssl_dist.data.folder import MAX_PIXELS
from ssl_dist.data.prepare import prepare_imagefolder, split_files
from ssl_dist.data.reader import decode_image
from ssl_dist.data.shards import MANIFEST, MAX_SKIPPED, read_manifest, verify, write_shards
from ssl_dist.data.synthetic import bomb_png, make_imagefolder
from tests.conftest import indexed_source

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """600 train + 100 val digits, 48-64 px canvases, with grey, CMYK and PNG files."""
    root = tmp_path_factory.mktemp("folder")
    return make_imagefolder(root, 600, 100, max_side=64, corrupt=0)


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def samples(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: payload} over the split's shards, in shard order."""
    found: dict[str, dict[str, bytes]] = {}
    for info in read_manifest(out).splits[split].shards:
        for m, data in members(out / info.name):
            key, ext = m.name.split(".", 1)
            found.setdefault(key, {})[ext] = data
    return found


def test_every_shard_mixes_the_classes(folder, tmp_path):
    """The folder is class-sorted; each shard of 200 holds no class above twice its share."""
    out = tmp_path / "out"
    prepare_imagefolder(folder.root, out, samples_per_shard=200, workers=1)
    manifest = read_manifest(out)
    for split in ("train", "val"):
        labels = [int(p["cls"]) for p in samples(out, split).values()]
        share = Counter(labels)
        for info in manifest.splits[split].shards:
            if info.samples < 100:
                continue
            shard = Counter(int(d) for m, d in members(out / info.name) if m.name.endswith(".cls"))
            for c, n in shard.items():
                expected = info.samples * share[c] / len(labels)
                assert n <= 2 * expected, (info.name, c, n, expected)
    assert len(manifest.splits["train"].shards) == 3


def test_original_bytes_codecs_and_stats(folder, tmp_path):
    out = tmp_path / "out"
    manifest = prepare_imagefolder(folder.root, out, samples_per_shard=250, workers=1)
    assert verify(out) == []
    _, order, _ = split_files(folder.root, 0.2, 0)
    for split in ("train", "val"):
        got = samples(out, split)
        assert manifest.splits[split].samples == len(got) == folder.readable(split)
        exts = set()
        for (key, parts), (rel, label) in zip(got.items(), order[split], strict=True):
            original = (folder.root / rel).read_bytes()
            (ext,) = set(parts) - {"cls"}
            exts.add(ext)
            assert parts[ext] == original, key  # never re-encoded
            assert int(parts["cls"]) == label
            # The extension names the codec, whatever the file's own suffix says.
            assert original.startswith(b"\x89PNG") == (ext == "png")
            image = decode_image(parts[ext], 16, 3)  # CMYK and grey JPEGs decode to RGB
            assert image.shape == (3, 16, 16)
        assert manifest.splits[split].codecs == sorted(exts) == ["jpg", "png"]
    assert manifest.channels == 3 and manifest.skipped_count == 0
    # mean / std from a seeded sample of 500 train images, close to a full pass.
    assert manifest.stats_images == 500
    pixels = []
    for rel, _ in order["train"]:
        with Image.open(folder.root / rel) as im:
            pixels.append(np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3) / 255)
    full = np.concatenate(pixels)
    assert np.allclose(manifest.mean, full.mean(0), atol=0.02), (manifest.mean, full.mean(0))
    assert np.allclose(manifest.std, full.std(0), atol=0.02), (manifest.std, full.std(0))
    assert min(manifest.image_size) >= 48 and max(manifest.image_size) <= 64


def test_the_training_stream_reads_every_codec(folder, tmp_path):
    """JPEG (colour, grey, CMYK) and PNG members, as the stream decodes them for training."""
    from ssl_dist.config import DataConfig
    from ssl_dist.data.stream import stream

    out = tmp_path / "out"
    m = prepare_imagefolder(folder.root, out, samples_per_shard=100, workers=1)
    cfg = DataConfig(manifest=str(out / MANIFEST), batch_size=50, image_size=16, loader_workers=0)
    s = stream(cfg, 0, 1, 0, 0)
    batches = list(s)
    assert s.stats.skipped == 0 and s.stats.lost == 0
    assert m.splits["train"].samples == sum(len(b.labels) for b in batches) == 600
    assert batches[0].images.shape == (50, 3, 16, 16)


def _run_twice(folder, tmp_path, workers: tuple[int, int], seeds=(0, 0)):
    outs = []
    for w, seed in zip(workers, seeds, strict=True):
        out = tmp_path / f"w{w}-s{seed}"
        prepare_imagefolder(folder.root, out, samples_per_shard=150, seed=seed, workers=w)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    return outs


@pytest.mark.slow  # starts a pool of writer processes
def test_same_bytes_with_one_or_two_workers(folder, tmp_path):
    one, two = _run_twice(folder, tmp_path, (1, 2))
    assert (
        list(one)
        == list(two)
        == [MANIFEST] + [f"train-00000{i}.tar" for i in range(4)] + ["val-000000.tar"]
    )
    assert one == two
    for m, _ in members(tmp_path / "w2-s0" / "train-000001.tar"):
        assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o444)


@pytest.mark.slow  # starts a pool of writer processes
def test_interrupted_run_leaves_nothing(folder, tmp_path):
    out = tmp_path / "out"

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_imagefolder(folder.root, out, 100, workers=2, progress=interrupt)
    assert not out.exists()


def test_another_seed_gives_another_order(folder, tmp_path):
    a, b = _run_twice(folder, tmp_path, (1, 1), seeds=(0, 1))
    assert a["train-000000.tar"] != b["train-000000.tar"]
    assert json.loads(a[MANIFEST])["mean"] != json.loads(b[MANIFEST])["mean"]


def test_max_side_shrinks_once_as_jpeg(folder, tmp_path):
    out = tmp_path / "out"
    manifest = prepare_imagefolder(folder.root, out, 400, max_side=56, workers=1)
    _, order, _ = split_files(folder.root, 0.2, 0)
    shrunk = 0
    for (_, parts), (rel, _) in zip(samples(out, "val").items(), order["val"], strict=True):
        original = (folder.root / rel).read_bytes()
        with Image.open(folder.root / rel) as im:
            w, h = im.size
        (ext,) = set(parts) - {"cls"}
        if max(w, h) <= 56:
            assert parts[ext] == original
            continue
        shrunk += 1
        assert ext == "jpg"
        with Image.open(io.BytesIO(parts[ext])) as small:
            assert max(small.size) == 56 and small.format == "JPEG"
            assert abs(small.size[0] / small.size[1] - w / h) < 0.05
    assert shrunk > 20 and manifest.splits["val"].codecs == ["jpg", "png"]


@pytest.fixture
def bad_folder(tmp_path):
    """Two classes of three good images, then the files a real folder holds by mistake."""
    root = tmp_path / "in"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), (i * 60, 90, 0)).save(root / c / f"{i}.jpg")
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cat" / "page.JPEG").write_bytes(b"<html>not an image</html>")
    (root / "dog" / "bomb.png").write_bytes(bomb_png())
    (root / "dog" / "notes.txt").write_text("not listed: not an image suffix")
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    Image.new("RGB", (8, 8)).save(outside / "more" / "x.png")
    os.symlink(outside / "secret.png", root / "dog" / "link.png")
    os.symlink(outside / "more", root / "dog" / "more")
    os.symlink(outside, root / "bird")  # a class folder outside the root
    os.symlink(root / "cat" / "1.jpg", root / "dog" / "inside.jpg")  # inside: followed
    os.symlink(root / "cat" / "gone.jpg", root / "cat" / "dangling.jpg")
    return root


def test_bad_files_are_skipped_counted_and_named(bad_folder, tmp_path):
    out = tmp_path / "out"
    m = prepare_imagefolder(bad_folder, out, 4, val_fraction=0.3, workers=1)
    assert verify(out) == []
    assert m.classes == ["cat", "dog"]
    assert sum(s.samples for s in m.splits.values()) == 7  # 6 + the link inside the root
    reasons = {s.path: s.reason for s in m.skipped}
    assert m.skipped_count == len(reasons) == 7
    assert reasons["cat/dangling.jpg"] == "not a regular file (a broken link?)"
    assert reasons["cat/truncated.jpg"].startswith("truncated (OSError: ")
    assert reasons["cat/page.JPEG"] == "not an image Pillow can identify"
    assert reasons["dog/bomb.png"].startswith("decompression bomb")
    for link in ("bird", "dog/link.png", "dog/more"):
        assert reasons[link] == "symlink outside the input root"
    # The manifest names them too, in a form a person can read.
    doc = json.loads((out / MANIFEST).read_text())
    assert {"path": "dog/bomb.png", "reason": reasons["dog/bomb.png"]} in doc["skipped"]


def test_skipped_list_is_capped(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    Image.new("L", (9, 9)).save(root / "a" / "good.png")
    for i in range(MAX_SKIPPED + 5):
        (root / "a" / f"bad{i:03d}.jpg").write_bytes(b"nope")
    m = prepare_imagefolder(root, tmp_path / "out", 1000, val_fraction=0.5, workers=1)
    assert m.skipped_count == MAX_SKIPPED + 5 and len(m.skipped) == MAX_SKIPPED
    assert m.channels == 1 and sum(s.samples for s in m.splits.values()) == 1


def test_a_bomb_below_pillows_own_limit_is_refused_by_ours(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "a" / "ok.png")
    Image.new("L", (300, 200)).save(root / "a" / "big.png")
    m = prepare_imagefolder(
        root, tmp_path / "o", 10, val_fraction=0.5, max_pixels=50_000, workers=1
    )
    assert [(s.path, s.reason) for s in m.skipped] == [
        ("a/big.png", "decompression bomb: 300x200 pixels, limit 50000")
    ]
    assert MAX_PIXELS >= 50_000_000


def test_no_readable_image_exits_2_with_one_message(tmp_path, monkeypatch, capsys):
    from ssl_dist import cli

    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"nope")
    (root / "a" / "y.png").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["ssl-dist", "data", "prepare", "--source", "imagefolder", "--input", str(root)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out), "--workers", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == [
        "error: no readable images among 2 files (a/x.jpg: not an image Pillow can identify; "
        "a/y.png: not an image Pillow can identify)"
    ]
    assert not out.exists()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        prepare_imagefolder(tmp_path / "empty", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_in_memory_sources_keep_png_and_write_the_same_bytes_twice(tmp_path):
    for name in ("a", "b"):
        m = write_shards(indexed_source(12, 4), tmp_path / name, 5)
    assert m.splits["train"].codecs == m.splits["val"].codecs == ["png"]
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert a == {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}


def test_webp_kept_other_formats_stored_once_as_png(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a" / "x.webp", lossless=True)
    Image.fromarray(pixels).save(root / "a" / "y.bmp")
    m = prepare_imagefolder(root, tmp_path / "out", 10, val_fraction=0.5, workers=1)
    got = {}
    for split in m.splits:
        for parts in samples(tmp_path / "out", split).values():
            got.update({e: d for e, d in parts.items() if e != "cls"})
    assert got["webp"] == (root / "a" / "x.webp").read_bytes()
    assert (np.asarray(Image.open(io.BytesIO(got["png"]))) == pixels).all()  # lossless
    assert {c for s in m.splits.values() for c in s.codecs} == {"png", "webp"}
