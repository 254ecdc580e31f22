"""Each stage's code deps in dvc.yaml are exactly its import closure, so `dvc repro` re-runs what an edit changed.

Every project module a stage's command imports, directly or through other
project modules (imports inside functions included), must be a dep of the
stage: a stage whose code changed but whose deps miss that file would be
skipped, and a stale model published. And nothing else may be: a phantom dep
(a file the stage never imports, or a whole folder) re-runs the stage, hours
of training perhaps, for an edit that cannot change its output.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

PROJECT_PACKAGES = ("tasks", "flows")


def module_file(name: str) -> Path | None:
    """The file of a project module ('tasks.lib.io' -> tasks/lib/io.py), or None outside the project."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module an import statement in the file names, at any depth of the code.

    package: the file's package, for relative imports (default: from its place in the repository)."""
    if package is None:
        package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from tasks.lib import io`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):   # importlib.import_module("tasks.lib.models")
            names.add(str(node.args[0].value))
    return names


def closure(start: Path) -> set[Path]:
    """The stage module and every project file it reaches through imports; parent packages count too."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
                found = module_file(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> Path:
    cmd = stage["cmd"].split()
    assert cmd[:2] == ["python", "-m"], f"stage command {stage['cmd']!r} is not `python -m <module>`"
    found = module_file(cmd[2])
    assert found is not None, f"{cmd[2]} is not a module of this project"
    return found


def code_deps(stage: dict) -> set[str]:
    """The deps of a stage that are project code (files or folders under tasks/ or flows/)."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    return {d.rstrip("/") for d in deps if d.split("/")[0] in PROJECT_PACKAGES}


def import_closure(stage: dict) -> set[str]:
    """The files a stage's command runs: its module and what it imports. An empty __init__.py runs no code,
    so it is no dep; one that gains code becomes one."""
    return {p.relative_to(REPO_ROOT).as_posix() for p in closure(stage_module(stage))
            if p.name != "__init__.py" or p.read_text().strip()}


def paste_list(stage: dict) -> str:
    """The code deps to paste into the stage's deps in dvc.yaml: its own module first, then the rest sorted."""
    own = stage_module(stage).relative_to(REPO_ROOT).as_posix()
    return "\n".join(f"      - {path}" for path in [own] + sorted(import_closure(stage) - {own}))


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_its_import_closure(name: str) -> None:
    stage = stages()[name]
    deps, needed = code_deps(stage), import_closure(stage)
    missing, phantom = sorted(needed - deps), sorted(deps - needed)
    problems = [f"misses {missing}, which it imports (an edit there would not re-run it)"] * bool(missing) + \
               [f"lists {phantom}, which it does not import (an edit there re-runs it for nothing)"] * bool(phantom)
    assert not problems, (f"dvc.yaml's stage {name} {' and '.join(problems)}. Replace its code deps (the tasks/ "
                          f"lines) with:\n{paste_list(stage)}")


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A module imported only inside a function is still run, so it is still a dep."""
    module = tmp_path / "stage.py"
    module.write_text("def main():\n    from tasks.lib import io\n    from .lib.config import load_params\n")
    assert {"tasks.lib.io", "tasks.lib.config.load_params"} <= imported_modules(module, package="tasks")


def test_the_check_sees_a_module_imported_by_name(tmp_path: Path) -> None:
    """importlib.import_module with a literal name runs that module as an import statement would."""
    module = tmp_path / "config.py"
    module.write_text("import importlib\n\ndef check(arch):\n"
                      "    importlib.import_module('tasks.lib.models').check_arch(arch)\n")
    assert "tasks.lib.models" in imported_modules(module, package="tasks.lib")


def test_stage_code_never_imports_prefect_dvc_or_the_handoff() -> None:
    """tasks/ stages run on any box with the PyTorch stack: no orchestration, no registry."""
    for name, stage in stages().items():
        for path in closure(stage_module(stage)):
            bad = {m for m in imported_modules(path)
                   if m.split(".")[0] in ("prefect", "dvc", "flows") or m.startswith("tasks.handoff")}
            assert not bad, f"stage {name}: {path.relative_to(REPO_ROOT)} imports {sorted(bad)}"


# What may import what (the layers of docs/architecture.md).
ALLOWED = {
    "tasks/lib": ("tasks.lib",),
    "tasks/training": ("tasks.lib", "tasks.training"),
    "tasks/handoff": ("tasks.lib", "tasks.handoff"),
    "tasks": ("tasks.lib", "tasks.training"),  # the stage modules
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT)
    return "/".join(rel.parts[:2]) if len(rel.parts) > 2 else rel.parts[0]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer: str) -> None:
    folder = REPO_ROOT / layer
    files = sorted(folder.glob("*.py")) if layer == "tasks" else sorted(folder.rglob("*.py"))
    assert files, f"{layer} has no modules"
    for path in files:
        project = {m for m in imported_modules(path) if m.split(".")[0] in PROJECT_PACKAGES and m != "tasks"}
        bad = sorted(m for m in project if not m.startswith(ALLOWED[layer]))
        assert not bad, f"{path.relative_to(REPO_ROOT)} ({layer}) imports {bad}; allowed: {ALLOWED[layer]}"


def test_predict_never_imports_torch() -> None:
    """The production side of predict must load on a box without torch."""
    reached = closure(REPO_ROOT / "tasks" / "handoff" / "predict.py")
    heavy = {m for p in reached for m in imported_modules(p) if m.split(".")[0] in ("torch", "torchvision", "timm")}
    assert not heavy, f"predict reaches imports of {sorted(heavy)}"



# --------------------------------------------------------------------------- docs/architecture.md

ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
CODE_PATH = re.compile(r"\b(?:tasks|flows|benchmarks|tests)/[\w./-]*\w/?")


def test_every_path_the_architecture_page_names_exists() -> None:
    named = set(CODE_PATH.findall(ARCHITECTURE.read_text()))
    gone = sorted(path for path in named if not (REPO_ROOT / path).exists())
    assert not gone, f"docs/architecture.md names {gone}, which do not exist: fix or drop them"


def test_the_architecture_page_names_every_module() -> None:
    """A maintainer finds every module of tasks/ and flows/ on the page, with what it is for."""
    named = set(CODE_PATH.findall(ARCHITECTURE.read_text()))
    modules = [p for package in PROJECT_PACKAGES for p in sorted((REPO_ROOT / package).rglob("*.py"))
               if p.name != "__init__.py"]
    unnamed = [p.relative_to(REPO_ROOT).as_posix() for p in modules if p.relative_to(REPO_ROOT).as_posix() not in named]
    assert not unnamed, f"docs/architecture.md does not name {unnamed}: add each, by its path, to the module table"

if __name__ == "__main__":   # `python -m tests.test_architecture`: every stage's code deps, to paste into dvc.yaml
    for stage_name, spec in stages().items():
        print(f"{stage_name}:\n{paste_list(spec)}")
