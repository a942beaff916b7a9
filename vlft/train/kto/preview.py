"""How `vlft preview --stage kto` shows a record (vlft/stages.py `preview_parts`): the prompt, the record's own
answer with the tokens that train, and the KL sequence -- the prompt with another record's answer (data/kto.py
KL_PAIRING) -- whose log-probs only estimate the KL reference point, detached: none of its tokens train."""
from __future__ import annotations

from dataclasses import replace

from vlft.constants import IGNORE_INDEX
from vlft.preview import completion_parts

KL_PART = "kl_estimate"


def preview_parts(item: dict, encoder, sample, specs) -> list:
    """preview.completion_parts with the record's answer named by its label ("desirable" / "undesirable") and the
    KL side renamed KL_PART, all its labels IGNORE_INDEX."""
    label = "desirable" if sample.label else "undesirable"
    return [replace(p, name=KL_PART, labels=[IGNORE_INDEX] * len(p.ids), kinds=None) if p.name == "kl" else
            replace(p, name=label) if p.name == "completion" else p
            for p in completion_parts(item, encoder, sample, specs)]
