"""The layer contract (pyproject's ``[tool.importlinter]``, README "Layout"): the checker passes
on the package, fails on a copy with a back-edge, and covers every module."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ssl_dist"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "contracts"
]
LAYERS_NAME = "Layers: apps > jobs > services > runtime > methods > core"


def _lint(cwd: Path, config: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _contract(contract_id: str) -> dict:
    return next(c for c in CONTRACTS if c["id"] == contract_id)


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _in(module: str, entry: str) -> bool:
    return module == entry or module.startswith(entry + ".")


def test_the_package_keeps_every_contract():
    r = _lint(ROOT, ROOT / "pyproject.toml", ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{LAYERS_NAME} KEPT" in r.stdout
    assert "0 broken" in r.stdout


def test_a_back_edge_breaks_the_layer_contract(tmp_path):
    """A core module importing an app: the checker exits non-zero naming the contract and the
    import. It runs on a copy of the package and of the config, so the real tree is untouched."""
    shutil.copytree(PACKAGE, tmp_path / "ssl_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    losses = tmp_path / "ssl_dist" / "losses.py"
    losses.write_text(losses.read_text() + "\nimport ssl_dist.cli  # a back-edge\n")
    r = _lint(tmp_path, tmp_path / "pyproject.toml", tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"{LAYERS_NAME} BROKEN" in out
    assert "ssl_dist.losses -> ssl_dist.cli" in out  # the copy was checked, not the tree


def test_every_module_sits_in_one_layer():
    """A new module must be placed: every module is in exactly one layer, except the package
    folders that hold modules of several layers (their __init__ imports nothing)."""
    entries = [
        name.strip()
        for layer in _contract("layers")["layers"]
        for name in layer.replace(":", "|").split("|")
    ]
    for module in _modules():
        homes = [e for e in entries if _in(module, e)]
        if module in ("ssl_dist", "ssl_dist.train", "ssl_dist.evaluate") and not homes:
            init = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
            tree = ast.parse(init.read_text())
            assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            continue
        assert len(homes) == 1, f"{module} is in layers {homes}: place it in one"


def test_the_deepspeed_contract_covers_everything_but_dist():
    top = {".".join(m.split(".")[:2]) for m in _modules() if m != "ssl_dist"}
    sources = set(_contract("deepspeed-in-dist")["source_modules"])
    assert sources == top - {"ssl_dist.dist"}


# Imports of sub-packages of an external package that import-linter cannot name (it forbids
# whole external packages only), checked here on the source: who may import them.
OWNERS = {"ray.train": ("ssl_dist.train",), "torch.distributed": ("ssl_dist.dist",)}
EXCEPTIONS: set[tuple[str, str]] = set()
"""``(module, external)`` pairs allowed anyway, each with its reason."""


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_only_train_imports_ray_train_and_only_dist_torch_distributed():
    bad = []
    for module in _modules():
        parts = module.split(".")[1:]
        path = PACKAGE.joinpath(*parts).with_suffix(".py")
        if not path.is_file():
            path = PACKAGE.joinpath(*parts, "__init__.py")
        imported = _imported(ast.parse(path.read_text()))
        for external, owners in OWNERS.items():
            uses = any(_in(name, external) for name in imported)
            allowed = any(_in(module, o) for o in owners) or (module, external) in EXCEPTIONS
            if uses and not allowed:
                bad.append(f"{module} imports {external}")
    assert not bad


def test_no_import_cycles():
    """No module reaches itself through imports (function-level ones included)."""
    graph = grimp.build_graph("ssl_dist", exclude_type_checking_imports=True, cache_dir=None)
    cycles = [
        m
        for m in graph.modules
        for imported in graph.find_modules_directly_imported_by(m)
        if graph.chain_exists(imported=m, importer=imported)
    ]
    assert not cycles
