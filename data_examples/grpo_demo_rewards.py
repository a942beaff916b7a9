"""The GRPO demo's learnable reward: scripts/finetune_grpo.sh with no settings uses it next to the built-in `count`.

The demo model is a tiny random network. It cannot count shapes, so `count` stays near 0, and a reward that every
completion of a prompt gets alike teaches nothing (every advantage is 0: `frac_reward_zero_std` 1, `grad_norm` 0).
`starts_with_word` asks for something the random model already does half the time - to begin its answer with a
word rather than with punctuation or a broken byte - so the completions of a prompt differ, GRPO has a signal, and
the reward's mean rises over the demo's steps (`rewards/starts_with_word/mean`, completions.jsonl). For a real
model use the built-ins (`count`, `accuracy`, `format`, ...) or your own function with this signature (TRL's).
"""


def starts_with_word(completions, **kwargs) -> list[float]:
    """1.0 if the completion's first character other than white space is an ASCII letter (a-z, A-Z), else 0.0.
    `completions`: the generated texts (strings); the other keyword arguments (prompts, completion_ids, the
    record's columns, trainer_state, ...) are not used."""
    rewards = []
    for text in completions:
        first = text.strip()[:1]
        rewards.append(1.0 if first.isascii() and first.isalpha() else 0.0)
    return rewards
