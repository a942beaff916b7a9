"""The KTO stage's data (Ethayarajh et al. 2024, arXiv 2402.01306): single answers marked good or bad.

One record is a prompt (with its media), one answer and a label, TRL's unpaired layout in vlft's record style:

    {"image": "cat.png",                                            LLaVA: the prompt conversation (optional system
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}],   turn, history allowed, last turn human)
     "completion": "A cat.",                   (or {"from": "gpt", "value": "A cat."})
     "label": true}                            true / 1: desirable (thumbs up); false / 0: undesirable (thumbs down)

    {"image": "cat.png", "prompt": "<image>\\nWhat is it?",          2U1's flat form: one human turn as a string
     "completion": "A dog.", "label": false}

The prompt and the answer are read as DPO reads a prompt and its chosen answer (data/preference.py: the same
layouts, media keys, `system` key, reasoning inline or in `reasoning_content`, and the same problems, named by the
field the user wrote).

The KL side. KTO's reference point z0 = KL(pi || pi_ref) is estimated, as TRL does, from mismatched pairs: a prompt
x_i with an answer y_j written for another prompt, averaged over the batch (train/kto/loss.py). TRL builds them by
cycling the answers of each fixed batch by one, so its sampler must stay sequential. vlft fixes the pairing on the
dataset instead (`kl_partner`): of n items, item i's KL answer is the answer of item (i + n // 2) mod n, half the
training set away, so that a file grouped by prompt (a prompt's good and bad answers side by side, as unpaired data
often comes) does not pair a prompt with its own answers, which a cycle by one would do. The rule does not depend on
the batch, so shuffling, length grouping and precomputed reference log-probs (one value per item) all keep it. The
KL sequence shows item i's own prompt and pictures: the vision tower runs once per item for both rows
(train/preference/logprobs.py).

Items hold prompt_ids, the answer `completion_ids` / `completion_mask`, the KL answer `kl_ids` / `kl_mask`, `label`
and `record` (the dataset index); batches are data/dpo.py's preference batches, 2B rows [completion rows; KL rows],
with `label` and `item_index` (the dataset indices: the rows of precomputed reference log-probs) (`KTOCollator`).

Over-long records (`--truncation_mode`, as DPO): `keep_start` cuts the answer from its end to fit `--max_seq_length`,
`drop` leaves the record out (counted and listed). A prompt is never cut. The KL answer (another record's) is always
cut to fit: it only estimates the reference point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlft.data.collator import SFTCollator
from vlft.data.dpo import MEDIA_KEYS, PreferenceCollator, PreferenceFormat
from vlft.data.encoding import EncodingError
from vlft.data.llava import LLAVA_KEYS, parse_record
from vlft.data.media import MediaError
from vlft.data.preference import _answer, parse_prompt
from vlft.data.prepare import RecordFormat
from vlft.data.sft import SFTDataset
from vlft.errors import Problem, VlftError

ANSWER_KEY, LABEL_KEY = "completion", "label"
# the top-level keys a KTO record is read from (data preparation lists any other key as unused)
KTO_KEYS = LLAVA_KEYS | {"prompt", ANSWER_KEY, LABEL_KEY}
# the batch key holding each item's dataset index (the reference cache's row); items hold it as `record`, the key by
# which train/core/guard.py names a failing step's records and which model_inputs drops before the forward
INDEX_KEY = "item_index"
SIDES = ("completion", "kl")  # the two sequences of an item: its own answer, the KL answer
KL_PAIRING = "(i + n // 2) % n"  # `kl_partner`'s rule, as the reference cache's key records it
_LABEL_HINT = ("write the label as true (a desirable answer, thumbs up) or false (undesirable, thumbs down); "
               "1 and 0 are read too")


@dataclass
class KTOSample:
    index: int  # position in the data file
    id: str | None
    messages: list[dict]  # the prompt as chat-template messages, ending with a user turn
    completion: str  # the answer without its reasoning (an inline think block is split off)
    label: bool  # True: desirable
    images: list[str]  # paths as written, in tag order
    videos: list = field(default_factory=list)
    completion_reasoning: str | None = None  # the answer's reasoning, inline or from the field; None when none
    turn_offset: int = 0  # messages[k] is the record's conversations[k - turn_offset] (llava.Sample)
    answer_keys = (ANSWER_KEY,)  # the record field of each completion, for problems (data/prepare.py)

    @property
    def completions(self) -> tuple[dict]:
        """The answer as the one assistant chat message the record has (data/prepare.py measures prompt + it)."""
        reasoning = {} if self.completion_reasoning is None else {"reasoning_content": self.completion_reasoning}
        return ({"role": "assistant", "content": self.completion} | reasoning,)


def parse_label(value: object, report) -> bool | None:
    """A record's `label` as a bool: JSON true / false, or the numbers 1 / 0 (👍 / 👎); None when missing or
    anything else (reported under the field `label`)."""
    if value is None:
        report(LABEL_KEY, "'label' is missing", _LABEL_HINT)
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):  # a numpy scalar (parquet, arrow)
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    shown = f"the string {value!r}" if isinstance(value, str) else f"{value!r}"
    report(LABEL_KEY, f"'label' is {shown}", _LABEL_HINT)
    return None


def parse_kto_record(record: object, index: int, file: str) -> tuple[KTOSample | None, list[Problem]]:
    """One KTO record (either layout of the module docstring) -> KTOSample, or (None, every problem found)."""
    if not isinstance(record, dict):
        return parse_record(record, index, file)  # reports the non-object record the SFT way
    sample, problems, report = parse_prompt(record, index, file)
    flat = "conversations" not in record and "prompt" in record  # the field to name
    paired = [key for key in ("chosen", "rejected") if key in record]
    if paired and ANSWER_KEY not in record:  # a DPO file given to the KTO stage
        report(paired[0], f"'{paired[0]}' is a preference pair's field; a KTO record has one 'completion' and a "
               "'label'", "train pairs with `vlft dpo`, or write each pair as two records: the chosen answer with "
               '"label": true, the rejected one with "label": false')
        return None, problems
    answer = _answer(record.get(ANSWER_KEY), ANSWER_KEY, report)
    label = parse_label(record.get(LABEL_KEY), report)
    if sample is not None and sample.messages[-1]["role"] != "user":
        last = "prompt" if flat else f"conversations[{len(sample.messages) - 1 - sample.turn_offset}]"
        report(last, "the prompt ends with a gpt turn", "end the prompt with the human turn the answer replies to; "
               "the answer goes in 'completion'")
    if problems or sample is None:
        return None, problems
    completion, reasoning = answer
    return KTOSample(index, sample.id, sample.messages, completion, label, sample.images, sample.videos, reasoning,
                     sample.turn_offset), []


def record_format(max_seq_length: int, options=None) -> RecordFormat:
    """The KTO RecordFormat (vlft/stages.py): prompt + answer must fit `max_seq_length` under
    `options.truncation_mode` (keep_start, default: the answer is cut and the record flagged CUT; drop: the record
    is left out). The lengths are DPO's (data/dpo.py PreferenceFormat) on the record's one answer."""
    mode = getattr(options, "truncation_mode", None) or "keep_start"
    lengths = PreferenceFormat(max_seq_length, mode).lengths
    return RecordFormat("kto", parse_kto_record, lengths, keys=KTO_KEYS, cache_key=f"kto:{max_seq_length}:{mode}")


def kl_partner(i: int, n: int) -> int:
    """The item whose answer is item i's KL answer, of n items: (i + n // 2) mod n, half the training set away (see
    the module docstring). n == 1 gives the item itself (the stage refuses a file with one label, so n >= 2)."""
    return (i + n // 2) % n


class KTODataset(SFTDataset):
    """Prepared KTO samples -> one dict per record:

        prompt_ids [P], completion_ids [C], completion_mask [C], kl_ids [K], kl_mask [K] (long tensors; the masks
        are 1 on what the policy generates after the prompt, up to and including the answer's <|im_end|>, as in
        data/dpo.py), label (bool: desirable), record (int: the dataset index), and the prompt's media as the SFT
        dataset gives them (`pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
        `second_per_grid_ts`), shared by both sequences.

    The KL answer is that of item `kl_partner(i, len(self))` rendered after this item's prompt. `max_length` cuts
    both answers from their end so that prompt + answer <= max_length (None: no cut)."""

    def __init__(self, samples, image_paths, processor, *, media, video_sources=None, max_length: int | None = None,
                 raw_pixels: bool = False, thinking=None):
        super().__init__(samples, image_paths, processor, media=media, video_sources=video_sources,
                         raw_pixels=raw_pixels, thinking=thinking)
        self.max_length = max_length

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        partner = self.samples[kl_partner(i, len(self))]
        item: dict = {"record": i, "label": bool(sample.label)}
        try:
            image_specs = self._images(self.image_paths[i], item)
            video_specs = self._videos(self.video_sources[i], item)
        except MediaError as err:  # the file changed after the start-up check
            raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
        try:
            enc = self.encoder.encode_preference(sample.messages, (*sample.completions, *partner.completions),
                                                 image_specs, video_specs)
        except EncodingError as err:  # only the KL answer can fail here: the record's own was rendered at start-up
            raise VlftError(f"record {sample.index} (id {sample.id!r}) with the answer of record {partner.index} as "
                            f"its KL answer: {err}; {err.hint}") from None
        item["prompt_ids"] = torch.tensor(enc.prompt_ids, dtype=torch.long)
        room = None if self.max_length is None else self.max_length - len(enc.prompt_ids)
        for side, ids, mask in zip(SIDES, enc.completion_ids, enc.completion_masks):
            item[f"{side}_ids"] = torch.tensor(ids[:room], dtype=torch.long)
            item[f"{side}_mask"] = torch.tensor(mask[:room], dtype=torch.long)
        return item


class KTOCollator:
    """Items -> one padded batch of 2B rows, [completion rows; KL rows], plus `label` [B] (bool), `item_index` [B]
    (long: the items' `record`), and data/dpo.py's `image_copy_of` / `video_copy_of` (each KL row's pictures are
    its completion row's: the vision tower encodes them once). The batch is built by data/dpo.py's
    PreferenceCollator, as is: an item's answer is its chosen side, its KL answer the rejected side. `base` is the
    stage's SFTCollator."""

    def __init__(self, base: SFTCollator):
        self.pairs = PreferenceCollator(base)

    def __call__(self, items: list[dict]) -> dict:
        renamed = {f"{side}_{part}": f"{dpo_side}_{part}" for side, dpo_side in zip(SIDES, ("chosen", "rejected"))
                   for part in ("ids", "mask")}
        pairs = [{"prompt_ids": it["prompt_ids"], "pair_index": it["record"],
                  **{new: it[old] for old, new in renamed.items()}, **{k: it[k] for k in MEDIA_KEYS if k in it}}
                 for it in items]
        batch = self.pairs(pairs)
        batch[INDEX_KEY] = batch.pop("pair_index")
        batch["label"] = torch.tensor([bool(it["label"]) for it in items], dtype=torch.bool)
        return batch


def build_dataset(prepared, processor, *, media, max_length, thinking, raw_pixels: bool = True) -> KTODataset:
    """The stage's dataset over prepared data (vlft/stages.py): what training builds (uint8 pixels, normalised
    on the device: train/core/model_inputs.py)."""
    return KTODataset(prepared.samples, prepared.image_paths, processor, media=media,
                      video_sources=prepared.video_sources, max_length=max_length, raw_pixels=raw_pixels,
                      thinking=thinking)


def build_collator(processor, model=None, *, family=None, distributed: bool = False) -> KTOCollator:
    """The stage's collator for `model` (a bare Qwen-VL model: its special tokens and forward arguments; in
    distributed runs `family` gives the dummy media's shape, data/collator.py)."""
    return KTOCollator(SFTCollator.for_model(processor, model, family=family, distributed=distributed))


@dataclass(frozen=True)
class LabelBalance:
    """How many desirable (n_desirable) and undesirable (n_undesirable) records train, and the KTO paper's advice
    on the loss weights (Ethayarajh et al. 2024, eq. 8; TRL's KTOTrainer warns on the same rule): keep
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."""

    n_desirable: int
    n_undesirable: int
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    LOW, HIGH = 1.0, 4 / 3

    @property
    def ratio(self) -> float:
        """desirable_weight * n_desirable / (undesirable_weight * n_undesirable); inf with no undesirable record."""
        bottom = self.undesirable_weight * self.n_undesirable
        return float("inf") if bottom == 0 else self.desirable_weight * self.n_desirable / bottom

    @property
    def in_range(self) -> bool:
        return self.LOW <= self.ratio <= self.HIGH + 1e-9

    def desirable_weights(self) -> tuple[float, float]:
        """The --desirable_weight range that puts the ratio in [1, 4/3] at the current --undesirable_weight."""
        base = self.undesirable_weight * self.n_undesirable / self.n_desirable
        return base * self.LOW, base * self.HIGH

    def undesirable_weights(self) -> tuple[float, float]:
        """The --undesirable_weight range that puts the ratio in [1, 4/3] at the current --desirable_weight."""
        base = self.desirable_weight * self.n_desirable / self.n_undesirable
        return base / self.HIGH, base / self.LOW

    def line(self) -> str:
        """One line for the start-up log: the counts and the weighted ratio."""
        total = self.n_desirable + self.n_undesirable
        return (f"labels: {self.n_desirable} desirable, {self.n_undesirable} undesirable of {total} records; "
                f"desirable_weight x {self.n_desirable} / (undesirable_weight x {self.n_undesirable}) = "
                f"{self.ratio:.3g} (the KTO paper advises 1 to 4/3)")

    def advice(self) -> str | None:
        """None in range; else the weights that would balance the records (either flag, not both)."""
        if self.in_range:
            return None
        (d_low, d_high), (u_low, u_high) = self.desirable_weights(), self.undesirable_weights()
        return (f"the desirable and undesirable records are out of balance for KTO's loss ({self.ratio:.3g}, outside "
                f"[1, 4/3]): set --desirable_weight in [{d_low:.3g}, {d_high:.3g}] or --undesirable_weight in "
                f"[{u_low:.3g}, {u_high:.3g}] (one of them, not both)")


def label_balance(samples, *, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                  where: str = "the data") -> LabelBalance:
    """The LabelBalance of prepared KTO data: data/prepare.py's PreparedData (its stored DESIRABLE flags count the
    labels without reading a record: start-up at any data size) or a list of KTOSamples. VlftError (naming
    `where`, the data file(s)) when every record has the same label: KTO's loss then has no counterpart to weigh
    against and its reference point learns nothing from the other side."""
    from vlft.data.store import DESIRABLE

    counted = samples.count_flag(DESIRABLE) if hasattr(samples, "count_flag") else None
    records = getattr(samples, "samples", samples)
    n_desirable = counted if counted is not None else sum(1 for s in records if s.label)
    n_undesirable = len(records) - n_desirable
    if not n_desirable or not n_undesirable:
        label, other = ("true", "false (undesirable, thumbs down)") if n_desirable else \
            ("false", "true (desirable, thumbs up)")
        raise VlftError(f"{where}: all {len(records)} usable records have label {label}; KTO needs answers of both "
                        f"kinds -> add records with label {other}, or train on desirable answers alone with `vlft sft`")
    return LabelBalance(n_desirable, n_undesirable, desirable_weight, undesirable_weight)


def check_report(prepared, options=None, *, where: str = "the data") -> list[str]:
    """check-data's lines for KTO data (vlft/stages.py `report`): the label balance under the weights in
    `options` (desirable_weight / undesirable_weight, default 1 each, TRL's) and, when it is outside the KTO
    paper's range, the weights that would balance it. VlftError naming `where` when every record has one label."""
    balance = label_balance(prepared, desirable_weight=getattr(options, "desirable_weight", 1.0),
                            undesirable_weight=getattr(options, "undesirable_weight", 1.0), where=where)
    return [balance.line()] + ([f"warning: {balance.advice()}"] if balance.advice() else [])
