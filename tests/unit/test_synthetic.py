"""The image-folder generator: seeded, ImageNet's layout, class-sorted, and the awkward files a
real folder holds."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from ssl_dist.data.synthetic import CORRUPT, KINDS, make_imagefolder

pytestmark = pytest.mark.unit


def test_generator_is_seeded_and_looks_real(tmp_path):
    a = make_imagefolder(tmp_path / "a", 24, 6, seed=3, corrupt=3)
    b = make_imagefolder(tmp_path / "b", 24, 6, seed=3, corrupt=3)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)
    assert {f.parts[0] for f in files} == {"train", "val"}
    modes, sides, aspects = Counter(), [], []
    for path, kind, label in a.files["train"]:
        assert path.parent.name == a.classes[label]  # each class folder holds its own
        if kind in CORRUPT:
            continue
        with Image.open(path) as im:
            modes[(im.format, im.mode)] += 1
            sides.append(max(im.size))
            aspects.append(im.size[0] / im.size[1])
    assert min(sides) >= 48 and max(sides) <= 640 and max(sides) > 200
    assert min(aspects) > 0.45 and max(aspects) < 2.1 and min(aspects) < 0.9 < 1.1 < max(aspects)
    assert modes[("JPEG", "RGB")] > 10
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")} <= set(modes)
    disguised = [p for p, k, _ in a.files["train"] if k == "png_as_jpeg"]
    assert disguised and disguised[0].suffix == ".JPEG"
    assert disguised[0].read_bytes().startswith(b"\x89PNG")
    # Class-sorted on disk: the listing goes class by class.
    labels = [label for _, _, label in a.files["train"]]
    assert labels == sorted(labels)
    assert sum(k in CORRUPT for _, k, _ in a.files["train"]) == 3
    c = make_imagefolder(tmp_path / "c", 24, 6, seed=4, corrupt=3)
    assert sorted(p.read_bytes() for p in c.paths(*KINDS)) != sorted(
        p.read_bytes() for p in a.paths(*KINDS)
    )
