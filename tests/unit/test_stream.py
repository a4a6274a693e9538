"""The WebDataset stream on real tar shards: splitting, counts, determinism, bad and unsafe data."""

import io
import socket
import tarfile
import threading

import pytest

from ssl_dist.config import ConfigError, DataConfig
from ssl_dist.data.stream import StreamTimeout, UnsafeDataError, stream

pytestmark = pytest.mark.unit


def _cfg(out, **kw) -> DataConfig:
    base = dict(manifest=str(out / "manifest.json"), batch_size=8, image_size=8, shuffle_buffer=16)
    return DataConfig(**(base | kw))


def _read(cfg, rank, world, epoch=0, seed=0, **kw):
    s = stream(cfg, rank, world, epoch, seed, **kw)
    labels = [int(v) for b in s for v in b.labels]
    return s, labels


# Loader workers are processes: the cases with 2 of them belong to the slow tier.
WORKERS = [0, pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_epoch_partitions_the_dataset(make_shards, world, workers):
    out, manifest = make_shards(103, 10)  # 11 shards, the last one holds 3
    cfg = _cfg(out, loader_workers=workers)
    per_rank = [_read(cfg, r, world, epoch=1) for r in range(world)]
    counts = {s.stats.batches for s, _ in per_rank}
    assert len(counts) == 1, f"unequal batch counts per rank: {counts}"
    assert {len(s) for s, _ in per_rank} == counts
    seen = [v for _, labels in per_rank for v in labels]
    assert len(seen) == len(set(seen)), "a sample was read twice"
    assert set(seen) <= set(range(103))
    # Each shard (labels 10j..10j+9) is read by exactly one rank.
    shard_sets = [{v // 10 for v in labels} for _, labels in per_rank]
    for a in range(world):
        for b in range(a + 1, world):
            assert not shard_sets[a] & shard_sets[b]
    # The batch count is what the smallest possible share holds (the S // W smallest shards),
    # the same in every epoch; only the samples past it on each rank drop.
    sizes = [s.samples for s in manifest.splits["train"].shards]
    share = [sum(sizes[j] for j in shards) for shards in shard_sets]
    n = counts.pop()
    assert n == sum(sorted(sizes)[: len(sizes) // world]) // cfg.batch_size
    assert n * cfg.batch_size <= min(share)
    assert 103 - len(seen) == 103 - world * n * cfg.batch_size
    assert all(s.stats.skipped == 0 for s, _ in per_rank)


def test_exact_epoch_order_depends_on_epoch(make_shards):
    out, _ = make_shards(60, 10)
    cfg = _cfg(out)
    assert _read(cfg, 0, 2, epoch=0)[1] == _read(cfg, 0, 2, epoch=0)[1]
    assert _read(cfg, 0, 2, epoch=0)[1] != _read(cfg, 0, 2, epoch=1)[1]


@pytest.mark.parametrize("workers", WORKERS)
def test_resampled_is_reproducible(make_shards, workers):
    out, _ = make_shards(40, 10)
    cfg = _cfg(out, mode="resampled", steps_per_epoch=7, loader_workers=workers)
    s, a = _read(cfg, 1, 3, epoch=2, seed=5)
    assert len(a) == 7 * 8 and s.stats.batches == 7
    assert _read(cfg, 1, 3, epoch=2, seed=5)[1] == a
    assert _read(cfg, 1, 3, epoch=2, seed=6)[1] != a
    assert _read(cfg, 2, 3, epoch=2, seed=5)[1] != a


def _rewrite_sample(path, key, ext, payload, add=False):
    """Replace (or add) one member of a tar shard."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for m, data in members:
            if m.name == f"{key}.{ext}" and not add:
                data = payload
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
            if add and m.name == f"{key}.cls":
                extra = tarfile.TarInfo(f"{key}.{ext}")
                extra.size = len(payload)
                dst.addfile(extra, io.BytesIO(payload))


def test_corrupt_image_is_skipped_and_counted(make_shards):
    out, _ = make_shards(30, 10)
    _rewrite_sample(out / "train-000001.tar", "train0000013", "png", b"not a png at all")
    cfg = _cfg(out, shuffle_buffer=0)
    s, labels = _read(cfg, 0, 1, partial=True)
    assert s.stats.skipped == 1
    assert sorted(labels) == [i for i in range(30) if i != 13]
    # Exact mode still yields its planned batch count (3 batches of 8 from 29 good samples).
    s, labels = _read(cfg, 0, 1)
    assert s.stats.batches == len(s) == 3 and s.stats.skipped == 1


def test_pickle_sample_refused_unless_allowed(make_shards):
    out, _ = make_shards(10, 10)
    _rewrite_sample(out / "train-000000.tar", "train0000004", "pyd", b"\x80\x04K\x01.", add=True)
    with pytest.raises(UnsafeDataError, match="pickle"):
        _read(_cfg(out), 0, 1)
    s, labels = _read(_cfg(out, allow_unsafe=True, batch_size=5), 0, 1)
    assert len(labels) == 10


def test_pipe_urls_refused(make_shards):
    out, manifest = make_shards(10, 5)
    with pytest.raises(UnsafeDataError, match="pipe:"):
        stream(_cfg(out, manifest=f"pipe:cat {out}/manifest.json"), 0, 1, 0)
    pipes = [f"pipe:cat {out}/{s.name}" for s in manifest.splits["train"].shards]
    with pytest.raises(UnsafeDataError, match="pipe:"):
        stream(_cfg(out, shards=pipes), 0, 1, 0)


def test_shard_list_must_match_manifest(make_shards, tmp_path):
    out, manifest = make_shards(10, 5)
    names = [s.name for s in manifest.splits["train"].shards]
    ok = [f"file://{out}/{n}" for n in names]
    assert len(_read(_cfg(out, shards=ok, batch_size=5), 0, 1)[1]) == 10
    with pytest.raises(ConfigError, match="does not match"):
        stream(_cfg(out, shards=ok[:1]), 0, 1, 0)
    with pytest.raises(ConfigError, match="does not match"):
        stream(_cfg(out, shards=list(reversed(ok))), 0, 1, 0)


def test_fewer_shards_than_ranks_needs_resampled(make_shards):
    out, _ = make_shards(20, 10)
    with pytest.raises(ConfigError, match="resampled"):
        stream(_cfg(out), 0, 3, 0)
    assert len(_read(_cfg(out, mode="resampled"), 2, 3)[1]) > 0


@pytest.mark.slow  # a loopback HTTP server
def test_http_manifest_and_shards(make_shards):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    out, _ = make_shards(20, 10)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        labels = _read(_cfg(out, manifest=url, batch_size=5, shuffle_buffer=0), 0, 1)[1]
        assert sorted(labels) == list(range(20))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # a loopback socket that never answers, a 3 s timeout
def test_no_first_batch_fails_loudly(make_shards):
    out, manifest = make_shards(10, 10)
    # A server that accepts connections and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        urls = [f"http://127.0.0.1:{port}/{s.name}" for s in manifest.splits["train"].shards]
        cfg = _cfg(out, shards=urls, loader_workers=1, first_batch_timeout_s=3)
        with pytest.raises(StreamTimeout, match="first_batch_timeout_s"):
            _read(cfg, 0, 1)
    finally:
        silent.close()
