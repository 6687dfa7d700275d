"""The layers hold: which modules may import what, read from the source, not by importing it.

Every ``import`` / ``from ... import`` statement is found with ``ast`` (those inside functions too: a lazy
import is still a dependency), so the test is fast, needs none of the packages it forbids, and names each
offending ``file:line``. The rules (STYLE.md, issue 21):

    io/            bytes and storage: no torch, torchvision or Ray
    models/        tensors only: no storage (imgxlate.io, fsspec, boto3, s3fs, pyarrow)
    train/ loop    plain PyTorch (loop, data, degrade, objectives, tasks): no Ray, not even through what
                   they import at module level; the Ray Train glue is train/ray_train.py
    evaluate.py    used by training, so it imports nothing from imgxlate.train (no train <-> evaluate cycle)
    infer/stages   the job's per-block stage logic needs no Ray (nor does what it imports); every Ray Data
                   line lives in infer/raydata.py
    everywhere     no ``from imgxlate.x import _private`` from another module: what two modules share is
                   public, named and documented where it lives
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STORAGE = ("imgxlate.io", "fsspec", "boto3", "botocore", "s3fs", "pyarrow")
PLAIN_TORCH_TRAIN = ("imgxlate/train/loop.py", "imgxlate/train/data.py", "imgxlate/**/degrade.py",
                     "imgxlate/train/objectives.py", "imgxlate/train/tasks.py")


@dataclass(frozen=True)
class Rule:
    files: tuple[str, ...]        # globs under the repository root; each must match a file (a rename is noticed)
    forbidden: tuple[str, ...]    # module prefixes: 'ray' forbids ray and ray.data, not raydata
    why: str


RULES = [
    Rule(("imgxlate/io/**/*.py",), ("torch", "torchvision", "ray"),
         "io/ is bytes and storage; storage code never imports torch or Ray"),
    Rule(("imgxlate/models/**/*.py",), STORAGE, "models/ is tensors only; a model never sees a path or a URI"),
    Rule(PLAIN_TORCH_TRAIN, ("ray",), "the training loop is plain PyTorch (runs in a unit test); Ray Train glue "
                                      "is imgxlate/train/ray_train.py"),
    Rule(("imgxlate/evaluate.py",), ("imgxlate.train",), "train/tasks.py imports evaluate: importing back is a cycle"),
    Rule(("imgxlate/infer/stages.py",), ("ray",), "stage logic needs no Ray, so it is testable without it; "
                                                  "Ray Data lines live in imgxlate/infer/raydata.py"),
]

# Imports a rule would refuse that are allowed, each with its reason: {(file, imported module): why}.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    file: str                     # relative to ROOT
    line: int
    module: str                   # absolute: for `from a.b import c`, a.b
    names: tuple[str, ...]        # what a from-import takes (empty for `import a.b`)
    top_level: bool               # runs when the file is imported (not inside a function, not TYPE_CHECKING)

    def targets(self) -> list[str]:
        """Every module this may load: a.b, and a.b.c for `from a.b import c` (c may be a submodule)."""
        return [self.module, *(f"{self.module}.{n}" for n in self.names if n != "*")]


def module_of(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in ``path``, relative ones resolved, ``__future__`` left out."""
    rel, package = str(path.relative_to(root)), module_of(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(rel, child.lineno, a.name, (), top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                base = package.split(".")[:len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                found.append(Import(rel, child.lineno, module, tuple(a.name for a in child.names), top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not (
                isinstance(child, ast.If) and _is_type_checking(child))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _matches(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in ROOT.glob(pattern) if p.is_file())


def _where(imp: Import) -> str:
    statement = f"from {imp.module} import {', '.join(imp.names)}" if imp.names else f"import {imp.module}"
    return f"{imp.file}:{imp.line}: {statement}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.files[0].removeprefix("imgxlate/"))
def test_layer_imports_nothing_it_must_not(rule):
    missing = [g for g in rule.files if not _files(g)]
    assert not missing, f"no file matches {missing}: the rule ({rule.why}) would hold nothing; update its globs"
    bad = []
    for path in {p for g in rule.files for p in _files(g)}:
        for imp in imports(path):
            hit = next((f for t in imp.targets() for f in rule.forbidden if _matches(t, f)), None)
            if hit and (imp.file, imp.module) not in ALLOWED:
                bad.append((imp.file, imp.line, f"{_where(imp)}  ({hit} is forbidden here)"))
    assert not bad, f"{rule.why}:\n  " + "\n  ".join(text for *_, text in sorted(bad))


def _module_files() -> dict[str, Path]:
    return {module_of(p): p for p in ROOT.glob("imgxlate/**/*.py")}


def loaded_by(module: str, files: dict[str, Path]) -> dict[str, Import]:
    """What importing ``module`` loads (its packages' __init__ included), from top-level imports only,
    followed through imgxlate's own modules: {module: the first import that reaches it}."""
    reached: dict[str, Import] = {}
    read: set[str] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):   # a.b.c runs a, a.b, a.b.c
            if m in read or m not in files:
                continue
            read.add(m)
            for imp in imports(files[m]):
                for t in imp.targets() if imp.top_level else ():
                    reached.setdefault(t, imp)
                    todo.append(t)
    return reached


@pytest.mark.parametrize("pattern", [*PLAIN_TORCH_TRAIN, "imgxlate/infer/stages.py"])
def test_importing_a_module_that_needs_no_ray_loads_none(pattern):
    files = _module_files()
    for path in _files(pattern):
        reached = loaded_by(module_of(path), files)
        ray = sorted(f"{m} via {_where(imp)}" for m, imp in reached.items() if _matches(m, "ray"))
        assert not ray, f"importing {module_of(path)} loads Ray:\n  " + "\n  ".join(ray)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in sorted([*ROOT.glob("imgxlate/**/*.py"), *ROOT.glob("jobs/*.py")]):
        own = module_of(path)
        for imp in imports(path):
            if not _matches(imp.module, "imgxlate") or imp.module == own:
                continue
            names = [n for n in imp.names if _private(n)] + [p for p in imp.module.split(".") if _private(p)]
            if names:
                bad.append(f"{_where(imp)}  (private: {', '.join(names)})")
    assert not bad, "what two modules share is public, named and documented where it lives:\n  " + "\n  ".join(bad)


def test_the_reader_sees_every_import(tmp_path):
    """The parser itself: relative, nested and TYPE_CHECKING imports are all found, and placed right."""
    pkg = tmp_path / "imgxlate" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "from __future__ import annotations\nimport os, ray.data\nfrom . import sibling\nfrom ..io import _x\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "class C:\n    import numpy\n    def f(self):\n        from imgxlate.io import storage\n")
    got = [(i.line, i.module, i.names, i.top_level) for i in imports(pkg / "mod.py", tmp_path)]
    assert got == [(2, "os", (), True), (2, "ray.data", (), True), (3, "imgxlate.sub", ("sibling",), True),
                   (4, "imgxlate.io", ("_x",), True), (5, "typing", ("TYPE_CHECKING",), True),
                   (7, "torch", (), False), (9, "numpy", (), True), (11, "imgxlate.io", ("storage",), False)]


def test_an_sr_model_actor_never_imports_torchvision():
    """torchvision's import (torch._dynamo with it) cost each model actor ~1.8 s before its first batch (issue 23:
    small runs start fast); an SR model's actor needs none of it."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from imgxlate.infer.stages import FusedStage; "
            "from imgxlate.infer.predictor import Predictor; "
            "Predictor('sr-x2').run([(np.zeros((8, 8, 3), np.uint8), None)]); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
