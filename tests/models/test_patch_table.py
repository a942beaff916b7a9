"""The patch table (`vlft.models.patches.PATCHES`) against the package and the tests it names: a patch that
is not in the table, or a table row whose proof does not exist, would let a patch outlive its reason unseen."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

from conftest import REPO

import vlft.models.patches as package
from vlft.models.patches import PATCHES

# Public functions of the patch modules that change no model: the kernels the Liger patch routes through, and
# read-only queries. Every other public function there patches a model and must be in the table.
NOT_PATCHES = {
    "vlft.models.patches._common.patched_parts",
    "vlft.models.patches._common.unwrap_model",
    "vlft.models.patches.liger.liger_applied",
    "vlft.models.patches.liger.liger_kernels",
    "vlft.models.patches.liger.torch_linear_cross_entropy_sum",
    "vlft.models.patches.liger.torch_rms_norm",
    "vlft.models.patches.liger.torch_silu_mul",
    "vlft.models.patches.linear_attention.record_spans",
    "vlft.models.patches.linear_attention.varlen_linear_attention",
}


def _public_functions() -> dict[str, object]:
    """qualified name -> function, for every public function defined in a module of the package."""
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def _test_node_ids(path) -> set[str]:
    """Node ids (without parameters) of the test functions and test-class methods a pytest file defines."""
    ids = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            ids.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids |= {f"{node.name}::{item.name}" for item in node.body
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test")}
    return ids


def test_every_row_is_filled_in_and_named_once():
    assert len({patch.name for patch in PATCHES}) == len(PATCHES)
    for patch in PATCHES:
        assert patch.functions and patch.fixes and patch.versions and patch.tests, patch.name


def test_every_tabled_test_exists():
    for patch in PATCHES:
        for node_id in patch.tests:
            path, _, name = node_id.partition("::")
            file = REPO / path
            assert file.is_file() and file.name.startswith("test_"), (patch.name, node_id)
            assert name in _test_node_ids(file), (patch.name, node_id)


def test_every_patch_function_is_tabled():
    tabled = [name for patch in PATCHES for name in patch.functions]
    public = _public_functions()
    assert len(tabled) == len(set(tabled)), "a function is in two rows"
    assert set(tabled) <= public.keys(), set(tabled) - public.keys()  # no row names a function that is gone
    assert NOT_PATCHES <= public.keys(), NOT_PATCHES - public.keys()
    assert not NOT_PATCHES & set(tabled)
    assert public.keys() - NOT_PATCHES == set(tabled), "untabled patches: " + str(public.keys() - NOT_PATCHES - set(tabled))


def test_the_package_exports_every_public_function():
    """`from vlft.models.patches import X` works for every public X, whichever module defines it."""
    for qualified, function in _public_functions().items():
        name = qualified.rpartition(".")[2]
        assert getattr(package, name, None) is function and name in package.__all__, qualified
