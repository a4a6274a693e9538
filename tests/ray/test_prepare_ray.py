"""`data prepare --source imagefolder --ray-address`: shards written as Ray tasks are the bytes
the local writer writes."""

from __future__ import annotations

import sys

import pytest

from ssl_dist import cli
from ssl_dist.data.prepare import prepare_imagefolder
from ssl_dist.data.synthetic import make_imagefolder

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_tasks_write_the_same_bytes(local_ray, tmp_path, monkeypatch, capsys):
    folder = make_imagefolder(tmp_path / "in", 200, 40, max_side=64, corrupt=3)
    local = tmp_path / "local"
    prepare_imagefolder(folder.root, local, 50, workers=1)
    out = tmp_path / "ray"
    argv = ["ssl-dist", "data", "prepare", "--source", "imagefolder", "--input", str(folder.root)]
    argv += ["--out", str(out), "--samples-per-shard", "50", "--ray-address", "auto"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0, capsys.readouterr().err
    assert "skipped 6 files" in capsys.readouterr().out
    names = sorted(p.name for p in local.iterdir())
    assert len(names) == 1 + 4 + 1  # the manifest, 4 train shards, 1 val shard
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
