"""The table of private `transformers.Trainer` methods vlft overrides (vlft/train/core/overrides.py) against the installed
Trainer, against vlft's trainer classes and against the concern mixins VlftTrainerMixin is composed of: a transformers
upgrade that renames such a method, changes its parameters or stops calling it, a new override that is not tabled,
and a concern mixin overriding what the table gives another concern, fail here instead of silently bypassing vlft's
behaviour (or raising a TypeError mid-run)."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re

from conftest import REPO
from transformers import Trainer

from vlft.train.core.overrides import (
    PRIVATE_TRAINER_OVERRIDES,
    TRAINERS,
    Param,
    check_private_overrides,
    misattributed_overrides,
    trainer_params,
    uncovered_overrides,
)


def _trainers() -> list[type]:
    classes = []
    for path in TRAINERS:
        module, _, name = path.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def _own_classes() -> dict[str, type]:
    """name -> class, for the classes of vlft's trainers' MROs that are not the Trainer's own (mixins included)."""
    return {cls.__name__: cls for top in _trainers() for cls in top.__mro__ if cls not in Trainer.__mro__}


def _call_shapes(params: tuple[Param, ...]) -> list[tuple[int, frozenset[str]]]:
    """Every call a signature with these parameters accepts, up to argument values: (number of positional
    arguments, keyword names). Variadic parameters add no shapes (nothing to enumerate)."""
    fixed = [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    shapes = []
    for n_pos in range(len(fixed) + 1):
        if any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in fixed[:n_pos]):
            break
        rest = fixed[n_pos:]
        if any(p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty for p in rest):
            continue  # a required positional-only parameter cannot be passed by keyword
        keywordable = [p for p in rest if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
        required = frozenset(p.name for p in keywordable if p.default is inspect.Parameter.empty)
        optional = [p.name for p in keywordable if p.default is not inspect.Parameter.empty]
        for mask in range(2 ** len(optional)):
            chosen = {name for i, name in enumerate(optional) if mask >> i & 1}
            shapes.append((n_pos, required | chosen))
    return shapes


def _rejected_calls(override, trainer_method) -> list[str]:
    """The calls the Trainer's method accepts that `override` (a function defined in a class) does not bind."""
    ours, theirs = inspect.signature(override), inspect.signature(trainer_method)
    rejected = []
    for n_pos, keywords in _call_shapes(trainer_params(trainer_method)):
        args = [object()] * (1 + n_pos)  # self, then the positional arguments
        kwargs = {name: object() for name in keywords}
        theirs.bind(*args, **kwargs)  # the enumeration holds: the Trainer's own method takes the call
        try:
            ours.bind(*args, **kwargs)
        except TypeError as err:
            rejected.append(f"{n_pos} positional + {sorted(keywords)}: {err}")
    return rejected


# ------------------------------------------------------------------------------------------------------ (1)

def test_every_row_is_filled_in_and_named_once():
    names = [row.name for row in PRIVATE_TRAINER_OVERRIDES]
    assert len(names) == len(set(names))
    for row in PRIVATE_TRAINER_OVERRIDES:
        assert row.name.startswith("_") and not row.name.startswith("__"), row.name
        assert row.classes and row.callers and row.why, row.name
        assert row.owner.startswith("vlft.train.core."), (row.name, row.owner)


def test_the_table_describes_the_installed_trainer():
    assert check_private_overrides() == []
    # and the rows are the installed Trainer's signatures in full (names, order, kinds, defaults)
    for row in PRIVATE_TRAINER_OVERRIDES:
        assert row.params == trainer_params(getattr(Trainer, row.name)), row.name


def test_a_changed_signature_a_removed_method_or_a_dropped_call_is_reported():
    rows = {row.name: row for row in PRIVATE_TRAINER_OVERRIDES}
    renamed = dataclasses.replace(rows["_save"], params=(Param("output_dir", None), Param("weights", None)))
    dropped_default = dataclasses.replace(rows["_get_grad_norm"], params=(Param("model"), Param("grad_norm")))
    changed = (renamed, dropped_default)
    problems = check_private_overrides(table=changed)
    assert len(problems) == 2
    assert problems[0].startswith("_save: ") and "state_dict=None" in problems[0] and "weights=None" in problems[0]
    assert problems[1].startswith("_get_grad_norm: ") and "grad_norm=None" in problems[1]

    class Upgraded(Trainer):  # a Trainer that lost _get_grad_norm and whose save_model no longer calls _save
        _get_grad_norm = None

        def save_model(self, output_dir=None, _internal_call=False):
            self.write_everything(output_dir)

    problems = check_private_overrides(Upgraded)
    assert [p.split(":")[0] for p in problems] == ["_get_grad_norm", "_save"], problems
    assert "no such method" in problems[0] and "save_model no longer uses self._save" in problems[1]


# ------------------------------------------------------------------------------------------------------ (2)

def test_every_vlft_trainer_class_is_in_trainers():
    """TRAINERS holds every class of vlft/ that subclasses a Trainer (read from the source: a module no test
    imports counts too), so the coverage test below sees every override."""
    found = set()
    for path in sorted((REPO / "vlft").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
                if bases & {"Trainer", "VlftTrainerMixin"}:
                    found.add(f"{module}:{node.name}")
    assert found == set(TRAINERS)


def test_every_private_override_is_tabled_and_every_row_is_overridden():
    assert uncovered_overrides(_trainers()) == []
    own = _own_classes()
    named = {name for row in PRIVATE_TRAINER_OVERRIDES for name in row.classes}
    assert named <= own.keys(), named - own.keys()  # a row naming a class that is not vlft's would check nothing
    assert {"VlftTrainerMixin", "SFTTrainer", "DPOTrainer", "GRPOTrainer"} <= own.keys()


def test_an_untabled_override_and_a_wrong_row_are_reported():
    from vlft.train.core.trainer import SFTTrainer

    class Extra(SFTTrainer):
        def _get_eval_sampler(self, eval_dataset):  # a private Trainer method the table does not list
            return None

        def _vlft_helper(self):  # not the Trainer's: no row needed
            return None

    problems = uncovered_overrides([Extra])
    assert len(problems) == 1 and "Extra._get_eval_sampler overrides the Trainer's private _get_eval_sampler" in \
        problems[0], problems

    wrong = PRIVATE_TRAINER_OVERRIDES + (dataclasses.replace(PRIVATE_TRAINER_OVERRIDES[0], name="_get_eval_sampler",
                                                             classes=("Extra", "SFTTrainer")),)
    problems = uncovered_overrides([Extra], table=wrong)
    assert problems == ["_get_eval_sampler: the table lists SFTTrainer, which does not define it itself"]


# ------------------------------------------------------------------------------------------------------ (2b)

def _concerns() -> list[type]:
    """The concern mixins VlftTrainerMixin is composed of, in MRO order."""
    from vlft.train.core.trainer import VlftTrainerMixin

    return [cls for cls in VlftTrainerMixin.__mro__[1:] if cls is not object]


def test_every_private_override_sits_in_the_concern_module_that_owns_it():
    assert misattributed_overrides() == []
    concerns = _concerns()
    modules = [cls.__module__ for cls in concerns]
    assert len(set(modules)) == len(modules) == 7, modules  # one concern per module
    assert all(m.startswith("vlft.train.core.") for m in modules), modules
    own = _own_classes()
    for row in PRIVATE_TRAINER_OVERRIDES:  # the owner's mixin is one of the classes the row names
        assert [name for name in row.classes if own[name].__module__ == row.owner], (row.name, row.owner)
    # each owner's mixin says in its docstring which private Trainer methods it overrides: exactly its rows
    for cls in concerns:
        owned = {row.name for row in PRIVATE_TRAINER_OVERRIDES if row.owner == cls.__module__}
        named = {name for name in re.findall(r"`(_\w+)`", cls.__doc__) if hasattr(Trainer, name)}
        assert "Overrides" in cls.__doc__ and named == owned, (cls.__name__, named, owned)


def test_a_concern_overriding_outside_its_rows_and_a_misattributed_row_are_reported():
    from vlft.train.core.counting import CountingMixin
    from vlft.train.core.guard import NonFiniteGuardMixin
    from vlft.train.core.inputs import InputsMixin
    from vlft.train.core.optimizer import OptimizerMixin
    from vlft.train.core.resume import ResumeMixin
    from vlft.train.core.saving import SavingMixin
    from vlft.train.core.token_loss import TokenLossMixin
    from vlft.train.core.trainer import VlftTrainerMixin

    class GreedyGuard(NonFiniteGuardMixin):  # a concern that also takes saving's method, and one nobody owns
        def _get_output_dir(self, trial):
            return None

        def _get_eval_sampler(self, eval_dataset):
            return None

    class Composed(OptimizerMixin, InputsMixin, CountingMixin, TokenLossMixin, GreedyGuard, SavingMixin, ResumeMixin):
        pass

    problems = misattributed_overrides(Composed)
    where = f"{__name__}.{GreedyGuard.__qualname__}"
    assert problems == [
        f"{where} overrides the Trainer's private _get_eval_sampler, which PRIVATE_TRAINER_OVERRIDES "
        "(vlft/train/core/overrides.py) attributes to no module",
        f"{where} overrides the Trainer's private _get_output_dir, which PRIVATE_TRAINER_OVERRIDES "
        "(vlft/train/core/overrides.py) attributes to vlft.train.core.saving"], problems

    class Itself(VlftTrainerMixin):  # the composition overriding one itself
        def _save(self, output_dir=None, state_dict=None):
            return None

    assert misattributed_overrides(Itself) == [
        "test_a_concern_overriding_outside_its_rows_and_a_misattributed_row_are_reported.<locals>.Itself._save "
        "overrides the Trainer's private _save itself; it belongs in the concern mixin that owns it"]

    rows = {row.name: row for row in PRIVATE_TRAINER_OVERRIDES}
    wrong = tuple(
        dataclasses.replace(row, owner="vlft.train.core.resume") if row.name == "_save" else
        dataclasses.replace(row, classes=("VlftTrainerMixin",)) if row.name == "_get_output_dir" else
        dataclasses.replace(row, owner="vlft.train.core.helpers") if row.name == "_get_grad_norm" else row
        for row in rows.values())
    problems = misattributed_overrides(table=wrong)
    assert problems == [
        "vlft.train.core.guard.NonFiniteGuardMixin overrides the Trainer's private _get_grad_norm, which "
        "PRIVATE_TRAINER_OVERRIDES (vlft/train/core/overrides.py) attributes to vlft.train.core.helpers",
        "vlft.train.core.saving.SavingMixin overrides the Trainer's private _save, which PRIVATE_TRAINER_OVERRIDES "
        "(vlft/train/core/overrides.py) attributes to vlft.train.core.resume",
        "_get_output_dir: the table says vlft.train.core.saving owns it, but its classes do not name SavingMixin",
        "_save: the table says vlft.train.core.resume owns it, but vlft.train.core.resume.ResumeMixin does not "
        "define it",
        "_get_grad_norm: its owner vlft.train.core.helpers is not the module of a concern mixin of VlftTrainerMixin",
    ], problems


# ------------------------------------------------------------------------------------------------------ (3)

def test_every_override_takes_every_call_the_trainer_method_takes():
    own = _own_classes()
    checked = 0
    for row in PRIVATE_TRAINER_OVERRIDES:
        for name in row.classes:
            override = vars(own[name])[row.name]
            assert _rejected_calls(override, getattr(Trainer, row.name)) == [], (name, row.name)
            checked += 1
    assert checked == 11  # 8 rows; GRPOTrainer: _get_train_sampler, _prepare_inputs; RewardTrainer: _load_from_checkpoint


def test_call_shapes_and_a_narrow_override_is_caught():
    # _save(output_dir=None, state_dict=None): 0, 1 or 2 positional, the rest by keyword or omitted
    shapes = _call_shapes((Param("output_dir", None), Param("state_dict", None)))
    assert sorted((n, sorted(k)) for n, k in shapes) == [
        (0, []), (0, ["output_dir"]), (0, ["output_dir", "state_dict"]), (0, ["state_dict"]),
        (1, []), (1, ["state_dict"]), (2, [])]

    def narrow(self, output_dir=None):  # drops state_dict: save_model's `_save(output_dir, state_dict=...)` breaks
        return None

    def renamed(self, out=None, state_dict=None):  # `_save(output_dir=...)` breaks
        return None

    assert len(_rejected_calls(narrow, Trainer._save)) == 4
    assert len(_rejected_calls(renamed, Trainer._save)) == 2
    assert _rejected_calls(lambda self, *args, **kwargs: None, Trainer._save) == []
