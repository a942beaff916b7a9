"""Which records share a row or a batch: packing plans, length-grouped order, and the padding they leave.

Pure Python on token counts (data preparation's `PreparedData.lengths`), so a plan for a million records is made
in seconds before any image is loaded, and the same plan comes out on every rank.
"""
from __future__ import annotations

import random
from bisect import bisect_left, insort


def plan_packs(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group record indices into packs of at most `max_len` tokens; a record is never split.

    Best-fit decreasing: records go longest first, each into the fullest pack it still fits (the pack with the
    least room left that is >= its length), or into a new pack. Packs are found by bisecting the sorted list of
    distinct room sizes, so the plan is O(n log n). Equal lengths keep record order, and the result is the same
    for the same input on every machine.

    Returns packs in the order of their first record; the indices inside a pack are ascending. A record longer
    than `max_len` raises ValueError naming it (the data check drops those before a plan is made).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"record {i} has a negative length ({n})")
        if n > max_len:
            raise ValueError(f"record {i} has {n} tokens, more than max_len {max_len}; it cannot be packed "
                             "(drop it, or raise --max_seq_length)")
    if not lengths:
        return []
    shortest = min(lengths)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable: ties stay in record order
    packs: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> packs with exactly that room (a stack: deterministic pick)
    rooms: list[int] = []  # sorted keys of by_room
    for i in order:
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k == len(rooms):
            pack = len(packs)
            packs.append([i])
            room = max_len - n
        else:
            fitting = rooms[k]
            stack = by_room[fitting]
            pack = stack.pop()
            if not stack:
                del by_room[fitting]
                rooms.pop(k)
            packs[pack].append(i)
            room = fitting - n
        if room < shortest:
            continue  # nothing left can fit: keep the room list short
        stack = by_room.get(room)
        if stack is None:
            by_room[room] = [pack]
            insort(rooms, room)
        else:
            stack.append(pack)
    for pack in packs:
        pack.sort()
    packs.sort(key=lambda p: p[0])
    return packs


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[int]:
    """A permutation of range(len(lengths)) for --group_by_length (the scheme of HF's LengthGroupedSampler).

    Shuffle with `seed`, cut into megabatches of `mega * batch_size` records, sort each megabatch longest first,
    and move the longest record of all to the front, so that consecutive batches of `batch_size` hold records of
    similar length (little padding) while the order stays random at the scale of megabatches. The first batch
    holds the longest record, so a batch that does not fit in memory fails at step 1, not hours in.
    """
    if batch_size < 1 or mega < 1:
        raise ValueError(f"batch_size and mega must be at least 1, got {batch_size} and {mega}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = mega * batch_size
    key = lengths.__getitem__
    megabatches = [sorted(order[s:s + size], key=key, reverse=True) for s in range(0, len(order), size)]
    if megabatches:
        top = max(range(len(megabatches)), key=lambda k: lengths[megabatches[k][0]])
        if top:
            first, other = megabatches[0], megabatches[top]
            first[0], other[0] = other[0], first[0]
            other.sort(key=key, reverse=True)  # what came from the first megabatch may be longer than the rest
    return [i for megabatch in megabatches for i in megabatch]


def padding_efficiency(batches: list[list], lengths: list[int], *, packed: bool, pad_to: int | None = None) -> float:
    """Fraction of the token slots a model computes on that hold real tokens (1.0: no padding at all).

    `batches` is what the model sees at each step, one entry per row:
    - packed=False: a batch is a list of record indices, one record per row (padded batching);
    - packed=True: a batch is a list of packs, each a list of record indices laid side by side in one row.
    Every batch is padded to its widest row, or to `pad_to` when given (a fixed width such as max_len, as
    static-shape kernels need). Returns total real tokens / total slots (rows x width) over all batches.
    """
    real = slots = 0
    for batch in batches:
        rows = [sum(lengths[i] for i in row) for row in batch] if packed else [lengths[i] for i in batch]
        if not rows:
            continue
        width = max(rows)
        if pad_to is not None:
            if width > pad_to:
                raise ValueError(f"a row of {width} tokens does not fit pad_to={pad_to}")
            width = pad_to
        real += sum(rows)
        slots += width * len(rows)
    return real / slots if slots else 1.0
