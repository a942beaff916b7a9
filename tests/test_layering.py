"""The house's import rules (docs/architecture.md), read from every import statement of the source, function-level
imports included: data/ and models/ never import each other (only train/ and the command modules know both);
vlft/config.py, data/ and models/ never import train/ (the arrows run one way); stages.py and cli.py import nothing
heavy at module level, so that `vlft <command> --bad-flag` answers before torch loads."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vlft

PACKAGE = Path(vlft.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool = False, package: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `path` (a module of `package`, by default the one its place
    in vlft/ gives), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    package = package or _module_name(path).rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _violations(files, forbidden: tuple[str, ...], *, top_level_only: bool = False, package: str | None = None) -> list[str]:
    out = []
    for path in files:
        for line, module in _imports(path, top_level_only=top_level_only, package=package):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.name}:{line} imports {module}")
    return sorted(set(out))


def _tree(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


RULES = {
    "data/ imports neither models/ nor train/": (_tree("data"), ("vlft.models", "vlft.train")),
    "models/ imports neither data/ nor train/": (_tree("models"), ("vlft.data", "vlft.train")),
    "config.py does not import train/": ([PACKAGE / "config.py"], ("vlft.train",)),
    "stages.py imports no vlft module and no library": ([PACKAGE / "stages.py"],
                                                        ("vlft", "torch", "transformers", "peft", "trl")),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_rule(rule):
    files, forbidden = RULES[rule]
    assert files, rule
    assert _violations(files, forbidden) == [], rule


def test_cli_imports_nothing_heavy_at_module_level():
    heavy = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "vlft.train", "vlft.data",
             "vlft.models", "vlft.config")
    assert _violations([PACKAGE / "cli.py"], heavy, top_level_only=True) == []


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
    """The rule checker itself: an import inside a function and a relative one are both found (a checker that
    missed them would pass any tree), and an allowed one is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from vlft.models.loading import load_model\n\n"
                     "from ..train import core\nfrom .media import load_image\n")
    found = _violations([probe], ("vlft.models", "vlft.train"), package="vlft.data")
    assert found == ["probe.py:4 imports vlft.models.loading", "probe.py:4 imports vlft.models.loading.load_model",
                     "probe.py:6 imports vlft.train", "probe.py:6 imports vlft.train.core"]
    assert _violations([probe], ("vlft.models",), top_level_only=True, package="vlft.data") == []
