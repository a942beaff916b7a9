"""The private methods of `transformers.Trainer` that vlft's trainers override, in one table:
`PRIVATE_TRAINER_OVERRIDES`.

A private method is no promise of transformers': a release may rename it, change its parameters, or stop calling
it. Each of those leaves vlft's override silently bypassed (the Trainer no longer calls it: no atomic checkpoints,
no non-finite-step check, no uint8 pixels normalised...) or broken (the Trainer calls it with an argument the
override does not take: a TypeError mid-run). Each row records what vlft relies on in the installed Trainer: the
method's parameters (name, kind, default; annotations are typing only and not compared), the Trainer methods that
call it, which vlft classes override it and why, and its owner: the concern module of train/core/ whose mixin
(one of the concerns VlftTrainerMixin is composed of, train/core/trainer.py) overrides it for every stage.
`check_private_overrides` compares the rows with a Trainer class; `uncovered_overrides` compares them with vlft's
trainer classes; `misattributed_overrides` with the concern mixins. tests/train/test_trainer_overrides.py runs them,
and checks that every override accepts every call the Trainer's own signature accepts.

When that test fails after a transformers upgrade:
1. Read the new Trainer's method (transformers/trainer.py) and its callers: what changed, and why.
2. Adapt each override named in the row (the row's `classes`, the `owner` module's first): its parameters, what
   it passes to `super()`, and the behaviour the row's `why` describes, if the Trainer now does it elsewhere (a
   renamed method, a new caller).
3. Update the row (parameters, callers) and `READ_AGAINST`, then run the tests that the row's overrides carry
   (resume, checkpoints, non-finite steps, packing, GRPO: tests/train/).
A new override of a private Trainer method gets a row here in the same change (the test fails without one); a
concern mixin overrides only the methods of the rows that name its module as owner.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

READ_AGAINST = "transformers 5.24.0"  # the Trainer the rows were read from

REQUIRED = inspect.Parameter.empty  # Param.default of a parameter without a default
POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD

# vlft's Trainer subclasses, "module:class". Their MROs' vlft classes (mixins included) are where overrides live.
# (VlftTrainerMixin's concern mixins are read from its bases, COMPOSITION.)
TRAINERS: tuple[str, ...] = (
    "vlft.train.core.trainer:SFTTrainer",
    "vlft.train.dpo.trainer:DPOTrainer",
    "vlft.train.grpo.trainer:GRPOTrainer",
    "vlft.train.kto.trainer:KTOTrainer",
    "vlft.train.rm.trainer:RewardTrainer",
)
COMPOSITION = "vlft.train.core.trainer:VlftTrainerMixin"  # its bases are the concern mixins; it overrides nothing itself


@dataclass(frozen=True)
class Param:
    """One parameter of the Trainer's method, `self` excluded."""

    name: str
    default: object = REQUIRED
    kind: object = POSITIONAL_OR_KEYWORD  # an inspect.Parameter kind

    def describe(self) -> str:
        text = self.name if self.default is REQUIRED else f"{self.name}={self.default!r}"
        return text if self.kind is POSITIONAL_OR_KEYWORD else f"{text} [{self.kind.description}]"


@dataclass(frozen=True)
class PrivateOverride:
    """One private Trainer method that vlft overrides."""

    name: str  # the method's name on transformers.Trainer
    params: tuple[Param, ...]  # its parameters in the Trainer, `self` excluded, in order
    callers: tuple[str, ...]  # Trainer methods whose calls of it vlft relies on (`self.<name>` in their source)
    classes: tuple[str, ...]  # vlft classes that define it themselves (class names, as in TRAINERS' MROs)
    owner: str  # the module that owns the override: a concern module of VlftTrainerMixin, "vlft.train.core.<concern>"
    why: str  # what vlft does there


PRIVATE_TRAINER_OVERRIDES: tuple[PrivateOverride, ...] = (
    PrivateOverride(
        name="_get_train_sampler", params=(Param("train_dataset", None),),
        callers=("get_train_dataloader",),  # passed as sampler_fn; _get_dataloader calls sampler_fn(dataset)
        classes=("InputsMixin", "GRPOTrainer"), owner="vlft.train.core.inputs",
        why="the epoch's length-grouped order (train_order) instead of the Trainer's shuffling; GRPO: PromptStepSampler "
            "(each prompt num_generations times, --num_iterations cycles)"),
    PrivateOverride(
        name="_get_grad_norm", params=(Param("model"), Param("grad_norm", None)),
        callers=("_run_epoch",),
        classes=("NonFiniteGuardMixin",), owner="vlft.train.core.guard",
        why="called once per step right before optimizer.step(): a non-finite loss or gradient norm stops the run or "
            "skips the step there, and a preemption stop is agreed in the same collective"),
    PrivateOverride(
        name="_get_output_dir", params=(Param("trial"),),
        callers=("_save_checkpoint",),
        classes=("SavingMixin",), owner="vlft.train.core.saving",
        why="points the Trainer's checkpoint save at <output_dir>/.vlft-staging while _save_checkpoint stages one"),
    PrivateOverride(
        name="_save_checkpoint", params=(Param("model"), Param("trial")),
        callers=("_maybe_log_save_evaluate",),
        classes=("SavingMixin",), owner="vlft.train.core.saving",
        why="checkpoints written atomically: weights checked finite, staged, renamed into place on every rank's "
            "success, best-checkpoint path fixed, then --save_total_limit rotation"),
    PrivateOverride(
        name="_prepare_inputs", params=(Param("inputs"),),
        callers=("training_step", "prediction_step"),
        classes=("InputsMixin", "GRPOTrainer"), owner="vlft.train.core.inputs",
        why="the model's inputs from vlft's batches on the device (uint8 pixels normalised, packed rows' mRoPE "
            "positions: train/core/model_inputs.py); GRPO: a batch of prompts becomes its rollout batch here"),
    PrivateOverride(
        name="_load_from_checkpoint", params=(Param("resume_from_checkpoint"), Param("model", None)),
        callers=("train", "_prepare_for_training"),
        classes=("ResumeMixin", "RewardTrainer"), owner="vlft.train.core.resume",
        why="a resume restores the fully trained non-LoRA weights next to a PEFT adapter, and loads full fine-tuning "
            "weights through from_pretrained's key conversion with every key checked; the reward model takes its "
            "scalar head out around that load and restores it from its own file"),
    PrivateOverride(
        name="_load_best_model", params=(),
        callers=("_finalize_training",),
        classes=("ResumeMixin",), owner="vlft.train.core.resume",
        why="--load_best_model_at_end loads the best checkpoint the way a resume does (HF's path drops the non-LoRA "
            "weights and misses the full fine-tuning keys); DeepSpeed and FSDP keep HF's path"),
    PrivateOverride(
        name="_save", params=(Param("output_dir", None), Param("state_dict", None)),
        callers=("save_model",),
        classes=("SavingMixin",), owner="vlft.train.core.saving",
        why="every save also writes vlft's run files (non_lora_trainables, vlft_trained.json, vlft_args.json) and the "
            "run's resume identity"),
)


def trainer_params(method) -> tuple[Param, ...]:
    """The parameters of a method (a function defined in a class), `self` excluded, as table Params."""
    params = list(inspect.signature(method).parameters.values())[1:]
    return tuple(Param(p.name, p.default, p.kind) for p in params)


def check_private_overrides(trainer_cls=None, table: tuple[PrivateOverride, ...] = PRIVATE_TRAINER_OVERRIDES) -> list[str]:
    """The rows of `table` that no longer describe `trainer_cls` (default: the installed `transformers.Trainer`),
    one readable line each: a method that is gone, one whose parameters (names, order, kinds, defaults) differ from
    the row's, or a recorded caller that is gone or no longer calls `self.<method>` in its source. [] when every
    row holds. The module docstring says what to do with a non-empty answer."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    where = f"{trainer_cls.__module__}.{trainer_cls.__qualname__}"
    problems = []
    for row in table:
        method = getattr(trainer_cls, row.name, None)
        if not callable(method):
            problems.append(f"{row.name}: {where} has no such method any more (overridden by {', '.join(row.classes)}: "
                            f"{row.why})")
            continue
        found = trainer_params(method)
        if found != row.params:
            problems.append(f"{row.name}: {where} takes ({', '.join(p.describe() for p in found)}), the table records "
                            f"({', '.join(p.describe() for p in row.params)}); adapt {', '.join(row.classes)}")
        for caller in row.callers:
            calls = _self_attributes(getattr(trainer_cls, caller, None))
            if calls is None:
                problems.append(f"{row.name}: its recorded caller {where}.{caller} is gone or has no readable source; "
                                f"find where the Trainer calls {row.name} now")
            elif row.name not in calls:
                problems.append(f"{row.name}: {where}.{caller} no longer uses self.{row.name}, so the override of "
                                f"{', '.join(row.classes)} may be bypassed there")
    return problems


def uncovered_overrides(classes, trainer_cls=None, table: tuple[PrivateOverride, ...] = PRIVATE_TRAINER_OVERRIDES) -> list[str]:
    """Disagreements between `table` and the Trainer subclasses `classes`, one readable line each: a private
    method of `trainer_cls` (default: the installed `transformers.Trainer`) that a class of their MROs defines
    itself (its own `__dict__`) but that no row lists for that class, and a row naming a class of those MROs that
    does not define the method itself. Only classes outside `trainer_cls`'s own MRO are read (vlft's, and any
    class between them and the Trainer). [] when the table and the classes agree."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    base = set(trainer_cls.__mro__)
    own = {cls.__name__: cls for top in classes for cls in top.__mro__ if cls not in base}
    listed = {(row.name, name) for row in table for name in row.classes}
    problems = []
    for cls_name, cls in own.items():
        for attr in vars(cls):
            if attr.startswith("_") and not attr.startswith("__") and hasattr(trainer_cls, attr) and \
                    (attr, cls_name) not in listed:
                problems.append(f"{cls.__module__}.{cls.__qualname__}.{attr} overrides the Trainer's private {attr}, "
                                "which PRIVATE_TRAINER_OVERRIDES (vlft/train/core/overrides.py) does not list for it")
    for row in table:
        for cls_name in row.classes:
            if cls_name in own and row.name not in vars(own[cls_name]):
                problems.append(f"{row.name}: the table lists {cls_name}, which does not define it itself")
    return problems


def misattributed_overrides(composition=None, trainer_cls=None,
                            table: tuple[PrivateOverride, ...] = PRIVATE_TRAINER_OVERRIDES) -> list[str]:
    """Disagreements between the rows' `owner`s and the concern mixins of `composition` (default: COMPOSITION, the
    class VlftTrainerMixin; its concerns are the classes of its MRO after itself, outside `trainer_cls`'s MRO), one
    readable line each: a private method of `trainer_cls` (default: the installed `transformers.Trainer`) that the
    composition defines itself; one that a concern mixin defines but no row owned by its module lists; a row owned
    by a concern's module that this concern does not define or whose `classes` do not name it; a row whose owner is
    no concern's module. [] when every private override sits in the concern that the table says owns it."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    if composition is None:
        import importlib

        module, _, name = COMPOSITION.partition(":")
        composition = getattr(importlib.import_module(module), name)
    base = set(trainer_cls.__mro__)

    def private(cls) -> set[str]:
        return {a for a in vars(cls) if a.startswith("_") and not a.startswith("__") and hasattr(trainer_cls, a)}

    problems = [f"{composition.__qualname__}.{attr} overrides the Trainer's private {attr} itself; it belongs in the "
                "concern mixin that owns it" for attr in sorted(private(composition))]
    concerns = [cls for cls in composition.__mro__[1:] if cls not in base]
    for cls in concerns:
        rows = {row.name: row for row in table if row.owner == cls.__module__}
        where = f"{cls.__module__}.{cls.__qualname__}"
        for attr in sorted(private(cls) - rows.keys()):
            owners = [row.owner for row in table if row.name == attr]
            problems.append(f"{where} overrides the Trainer's private {attr}, which PRIVATE_TRAINER_OVERRIDES "
                            f"(vlft/train/core/overrides.py) attributes to {owners[0] if owners else 'no module'}")
        for attr, row in sorted(rows.items()):
            if attr not in vars(cls):
                problems.append(f"{attr}: the table says {cls.__module__} owns it, but {where} does not define it")
            elif cls.__name__ not in row.classes:
                problems.append(f"{attr}: the table says {cls.__module__} owns it, but its classes do not name "
                                f"{cls.__name__}")
    modules = {cls.__module__ for cls in concerns}
    problems += [f"{row.name}: its owner {row.owner} is not the module of a concern mixin of "
                 f"{composition.__qualname__}" for row in table if row.owner not in modules]
    return problems


def _self_attributes(function) -> set[str] | None:
    """Names of the `self.<name>` attributes a function's source uses, or None without a function or source."""
    if not callable(function):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    return {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self"}
