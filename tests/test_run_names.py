"""vlft/run_dir.py owns every name a run writes (issue 26): each is one constant there, and no other module of
vlft/ spells it as a string literal. A source scan (ast, string constants), so a new literal is caught the day it
is written, not the day the name changes and the copy is missed."""
from __future__ import annotations

import ast
import re
import string
import sys
from pathlib import Path

import pytest

import vlft.run_dir as run_dir

PACKAGE = Path(run_dir.__file__).resolve().parent
OWNER = Path(run_dir.__file__).resolve()


def defined_names() -> dict[str, str]:
    """run_dir.py's public module-level str constants (its section "the names a run writes"): {constant: name}."""
    tree = ast.parse(OWNER.read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_"):
                    names[target.id] = node.value.value
    return names


def spelling(name: str) -> tuple[str, bool]:
    """What a copy of `name` would spell: the name itself, or for a template (`vlft_rollouts_rank{rank}.pt`) or a
    prefix (`checkpoint-`) its fixed beginning, which every name made from it starts with. Returns (text,
    is_prefix)."""
    head = next(string.Formatter().parse(name))[0]
    return (head, True) if head != name else (name, name.endswith("-"))


def _matches(part: str, text: str, is_prefix: bool) -> bool:
    return part.startswith(text) if is_prefix else part == text


def literal_spellings(source: str, names: dict[str, str]) -> list[tuple[int, str, str]]:
    """(line, constant, literal) for every string literal of `source` that spells one of `names`:
    - a literal without whitespace (a name or a path: `"log.jsonl"`, `f"checkpoint-{n}"`'s piece, `"a/log.jsonl"`)
      one of whose `/`-separated parts is the name (for a template or a prefix: starts with its fixed beginning);
    - a piece of an f-string that goes on with a path (`f"{run}/adapter_model.safetensors holds ..."`): its first
      word starts with `/` and one of that word's parts is the name.
    Prose (docstrings, comments, help texts, messages that mention a file in words) is not a copy and passes."""
    spelled = {constant: spelling(name) for constant, name in names.items()}
    tree = ast.parse(source)
    pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        value = node.value
        if not any(c.isspace() for c in value):
            parts = value.split("/")
        elif id(node) in pieces and value.startswith("/"):
            parts = re.split(r"[\s,;:()`'\"]", value, maxsplit=1)[0].split("/")
        else:
            continue
        found += [(node.lineno, constant, value) for constant, (text, is_prefix) in spelled.items()
                  if any(_matches(part, text, is_prefix) for part in parts)]
    return found


def test_the_scan_finds_copies_and_leaves_prose_alone():
    """The scanner itself, on a made-up module: every way of spelling a name is found, mentions in words are not
    (a scan that finds nothing would make the next test pass for nothing)."""
    names = {"LOG_FILE": "log.jsonl", "CHECKPOINT_PREFIX": "checkpoint-", "ROLLOUTS_FILE": "vlft_rollouts_rank{rank}.pt",
             "ADAPTER_WEIGHTS": "adapter_model.safetensors", "LATEST": "latest"}
    source = '''
"""A docstring naming <output_dir>/log.jsonl and checkpoint-N folders, and the `latest` checkpoint."""
a = Path(out) / "log.jsonl"
b = f"checkpoint-{step}"
c = "vlft_rollouts_rank0.pt"
d = f"vlft_rollouts_rank{rank}.pt"
e = f"{run}/adapter_model.safetensors holds keys"
f = "runs/checkpoint-12/trainer_state.json"
g = value == "latest"
h = f"--resume_from_checkpoint {value}: pass a checkpoint-N folder or `latest`"
i = "the latest value, not a mean"
'''
    found = {(line, constant) for line, constant, _ in literal_spellings(source, names)}
    assert found == {(3, "LOG_FILE"), (4, "CHECKPOINT_PREFIX"), (5, "ROLLOUTS_FILE"), (6, "ROLLOUTS_FILE"),
                     (7, "ADAPTER_WEIGHTS"), (8, "CHECKPOINT_PREFIX"), (9, "LATEST")}


def test_no_module_spells_a_run_name_run_dir_owns():
    names = defined_names()
    assert {"ARGS_FILE", "LOG_FILE", "STATE_FILE", "CHECKPOINT_PREFIX", "STAGING_DIR", "REF_CACHE_DIR",
            "COMPLETIONS_FILE", "PLOT_FILE", "MEDIA_FILE", "CARD_FILE", "ADAPTER_WEIGHTS"} <= names.keys()
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() == OWNER:
            continue
        for line, constant, literal in literal_spellings(path.read_text(), names):
            copies.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {literal!r} spells {constant} "
                          f"({names[constant]!r}): import it from vlft.run_dir")
    assert not copies, "\n".join(copies)


def test_each_name_is_one_constant():
    """Two constants with one name would let a reader and a writer disagree about which one a file is; two names
    sharing a fixed beginning would let one template's files be taken for the other's."""
    names = defined_names()
    by_value: dict[str, list[str]] = {}
    for constant, name in names.items():
        by_value.setdefault(name, []).append(constant)
    assert not {v: c for v, c in by_value.items() if len(c) > 1}
    prefixes = {c: spelling(n)[0] for c, n in names.items() if spelling(n)[1]}
    overlaps = [(c, other) for c, p in prefixes.items() for other, n in names.items()
                if other != c and n.startswith(p)]
    assert not overlaps
    # every name a run leaves before its first checkpoint is one of the constants
    assert run_dir.RUN_LEFTOVERS <= set(names.values())


@pytest.mark.parametrize("constant", sorted(defined_names()))
def test_names_are_plain_file_names(constant):
    """A name is one path component (a folder joins it with `/`), and a template fills with str.format."""
    name = getattr(run_dir, constant)
    assert name and "/" not in name and "\\" not in name and name.strip() == name
    fields = [f for _, f, _, _ in string.Formatter().parse(name) if f is not None]
    if fields:
        filled = name.format(**dict.fromkeys(fields, 3))
        assert "{" not in filled and filled.startswith(spelling(name)[0])


def test_run_dir_imports_only_the_standard_library():
    """Every module imports run_dir for its names; importing anything of vlft (or torch) at its top would make
    import cycles (models/ and train/ both import it) and slow `vlft --help`."""
    tree = ast.parse(OWNER.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
