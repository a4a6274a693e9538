import json

import numpy as np
import pytest

from ssl_dist.config import ConfigError
from ssl_dist.data.shards import MANIFEST, read_manifest, verify, write_shards
from ssl_dist.data.sources import digits, read_idx
from tests.conftest import indexed_source

pytestmark = pytest.mark.unit


def test_manifest_round_trip(make_shards):
    out, manifest = make_shards(25, 10, n_val=7)
    again = read_manifest(out)
    assert again == manifest
    assert [s.name for s in again.splits["train"].shards] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert [s.samples for s in again.splits["train"].shards] == [10, 10, 5]
    assert again.splits["val"].samples == 7
    for split in again.splits.values():
        for s in split.shards:
            assert (out / s.name).stat().st_size == s.bytes
    assert again.image_size == (8, 8) and again.channels == 1
    assert len(again.mean) == 1 and 0.3 < again.mean[0] < 0.7
    assert verify(out) == []


def test_verify_catches_flipped_byte(make_shards):
    out, manifest = make_shards(20, 10)
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and problems[0].startswith("train-000001.tar")


def test_verify_catches_truncated_shard(make_shards):
    out, _ = make_shards(20, 10)
    path = out / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:1500])
    problems = verify(out)
    # One line per problem, each naming the shard: its size, where reading broke off, the loss.
    assert problems[0] == "train-000000.tar: size 1500 bytes, manifest says 51200"
    assert all(p.startswith("train-000000.tar: ") for p in problems)
    assert problems[-1] == "train-000000.tar: 0 samples, manifest says 10: 10 lost"


def test_refuses_non_empty_dir_and_overwrites(tmp_path):
    out = tmp_path / "s"
    write_shards(indexed_source(10), out, 5)
    with pytest.raises(ConfigError, match="not empty"):
        write_shards(indexed_source(10), out, 5)
    m = write_shards(indexed_source(12), out, 4, overwrite=True)
    assert len(m.splits["train"].shards) == 3
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]


def test_interrupted_write_leaves_no_manifest(tmp_path):
    src = indexed_source(30)
    split = src.splits["train"]
    good_load = split.load

    def failing_load(i):
        if i == 25:
            raise KeyboardInterrupt
        return good_load(i)

    split.load = failing_load
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, 10)
    assert not (out / MANIFEST).exists()
    assert list(out.iterdir()) == []


def test_digits_seeded_split():
    a, b = digits(seed=1), digits(seed=1)
    assert a.splits["train"].labels == b.splits["train"].labels
    assert len(a.splits["train"]) + len(a.splits["val"]) == 1797
    img = next(iter(a.splits["train"]))[1]
    assert img.dtype == np.uint8 and img.shape == (8, 8) and img.max() > 200
    assert digits(seed=2).splits["train"].labels != a.splits["train"].labels


def test_idx_reader(tmp_path):
    import gzip
    import struct

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    assert (read_idx(path) == arr).all()
    short = tmp_path / "y-idx3-ubyte"
    short.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4))
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(short)
    path.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read"):
        read_idx(path)


def test_manifest_json_is_plain(make_shards):
    out, _ = make_shards(5, 5)
    doc = json.loads((out / MANIFEST).read_text())
    assert {"classes", "splits", "image_size", "source", "mean", "std"} <= doc.keys()
