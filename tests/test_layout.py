"""The shape of the code, held by tests: the stage folders and the code map
(docs/development.md) agree, no dependency's private names are used, no class mixes several of
the project's classes, modules stay readable, and imports point down the layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flux_agent"
DEPENDENCIES = ("aiohttp", "asyncpg", "prometheus_client")
# Private names of the standard library the package uses knowingly: not dependencies users
# upgrade, and documented (os._exit) or stable for decades (argparse's parser internals,
# which shell completion walks).
STDLIB_PRIVATE = {"_exit", "_actions", "_SubParsersAction"}
LONG_MODULE = 500  # lines
# The one declaration of every setting: a table, long by nature.
LONG_ALLOWED = {"flux_agent/core/settings.py"}
# Each stage folder imports only from the layers below it (and the top-level version).
LAYERS = ["core", "obs", "spool", "flush", "postgres", "forward", "checkpoints", "intake",
          "agent", "cli"]
STANDALONE = {"client", "kube"}  # import only core's pure helpers and the version


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_private_name_of_a_dependency_is_used():
    """A private name of aiohttp, asyncpg or prometheus_client pins users to the releases it
    exists in. Every ``x._name`` (and ``getattr(x, "_name")``) in the package must name
    something the package defines itself."""
    own: set[str] = set()
    trees = {path: ast.parse(path.read_text()) for path in modules()}
    for tree in trees.values():
        scopes: list[ast.AST] = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]
        for scope in scopes:  # names defined at module and class level
            for node in getattr(scope, "body", []):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    own.add(node.name)
                for target in getattr(node, "targets", [getattr(node, "target", None)]):
                    if isinstance(target, ast.Name):
                        own.add(target.id)
        for node in ast.walk(tree):  # attributes the package's own objects set on themselves
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                own.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"_[a-z0-9_]+", node.value) and node.value.isidentifier():
                # __slots__ entries declare attributes too
                own.add(node.value) if _in_slots(tree, node) else None
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] in DEPENDENCIES:
                parts = node.module.split(".") + [a.name for a in node.names]
                if any(p.startswith("_") for p in parts):
                    found.append(f"{rel(path)}:{node.lineno} from {node.module} import ...")
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                name = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr", "setattr") and \
                    len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                name = str(node.args[1].value)
            if name and name.startswith("_") and not name.startswith("__") \
                    and name not in own and name not in STDLIB_PRIVATE \
                    and name not in ("_replace", "_fields", "_asdict"):
                found.append(f"{rel(path)}:{node.lineno} {name}")
    assert not found, "private names of dependencies:\n" + "\n".join(found)


def _in_slots(tree: ast.AST, constant: ast.Constant) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets) \
                and any(c is constant for c in ast.walk(node.value)):
            return True
    return False


def test_no_class_mixes_several_of_the_projects_classes():
    """Composition, not shared-state mixins: a class derives from at most one of the
    package's own classes."""
    own_classes = set()
    trees = {path: ast.parse(path.read_text()) for path in modules()}
    for tree in trees.values():
        own_classes |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    mixed = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                         for b in node.bases]
                ours = [b for b in bases if b in own_classes]
                if len(ours) > 1:
                    mixed.append(f"{rel(path)}: {node.name}({', '.join(ours)})")
    assert not mixed, mixed


def test_modules_stay_readable():
    long = {rel(p): n for p in modules()
            if (n := len(p.read_text().splitlines())) > LONG_MODULE and rel(p) not in LONG_ALLOWED}
    assert not long, f"modules over {LONG_MODULE} lines: {long}"


def _stage(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _imported_stages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    here = path.relative_to(ROOT).with_suffix("").parts
    package = list(here[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                if node.module is None:
                    target_names = [[*base, a.name] for a in node.names]
                else:
                    target_names = [target]
            elif node.module and node.module.startswith("flux_agent"):
                target_names = [node.module.split(".")]
            else:
                continue
            for t in target_names:
                if len(t) > 1 and t[0] == "flux_agent":
                    out.add(t[1])
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for path in modules():
        stage = _stage(path)
        if stage is None:
            continue
        allowed: set[str]
        if stage == "cli":
            continue  # the top: it may use everything
        if stage in STANDALONE:
            allowed = {stage, "core", "_version"}
        else:
            allowed = set(LAYERS[: LAYERS.index(stage) + 1]) | {"_version"}
        bad = {s for s in _imported_stages(path) if s not in allowed and s in
               set(LAYERS) | STANDALONE}
        if bad:
            wrong.append(f"{rel(path)} imports {sorted(bad)}")
    assert not wrong, wrong


def _code_map() -> list[str]:
    text = (ROOT / "docs" / "development.md").read_text()
    block = re.search(r"```\nflux_agent/\n(.*?)```", text, re.S)
    assert block, "no code map (a block starting with flux_agent/)"
    paths = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        paths.append(line.split()[0])
    return paths


def test_the_code_map_is_the_tree():
    mapped = _code_map()
    tree = sorted(p.relative_to(PACKAGE).as_posix() for p in modules())
    assert sorted(mapped) == tree, (
        f"missing from the map: {sorted(set(tree) - set(mapped))}; "
        f"mapped but absent: {sorted(set(mapped) - set(tree))}")


FOLDERS = sorted(d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists())


def test_every_folder_has_its_place_in_the_layers():
    assert set(FOLDERS) <= set(LAYERS) | STANDALONE, sorted(set(FOLDERS) - set(LAYERS))


@pytest.mark.parametrize("stage", FOLDERS)
def test_every_stage_folder_says_what_it_is(stage: str):
    init = PACKAGE / stage / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{stage}/__init__.py has no doc"
