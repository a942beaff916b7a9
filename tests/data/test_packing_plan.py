"""Packing plans, length-grouped order and the padding efficiency they are judged by (pure Python, no model)."""
from __future__ import annotations

import random
import time

import pytest

from vlft.data.packing import length_grouped_order, padding_efficiency, plan_packs


def random_lengths(n: int, seed: int = 0, low: int = 1, high: int = 4096) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def assert_valid_plan(packs: list[list[int]], lengths: list[int], max_len: int) -> None:
    flat = [i for pack in packs for i in pack]
    assert sorted(flat) == list(range(len(lengths))), "every record exactly once"
    for pack in packs:
        assert pack, "no empty pack"
        assert pack == sorted(pack), "record order inside a pack"
        assert sum(lengths[i] for i in pack) <= max_len
    assert [p[0] for p in packs] == sorted(p[0] for p in packs), "packs ordered by their first record"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_is_valid_on_random_lengths(seed):
    lengths = random_lengths(3000, seed, high=2048)
    packs = plan_packs(lengths, 2048)
    assert_valid_plan(packs, lengths, 2048)
    lower_bound = -(-sum(lengths) // 2048)
    assert len(packs) <= lower_bound * 1.05 + 2


def test_record_of_exactly_max_len_gets_its_own_pack():
    lengths = [10, 100, 90, 5]
    packs = plan_packs(lengths, 100)
    assert [1] in packs
    assert_valid_plan(packs, lengths, 100)


def test_overlong_record_raises_naming_its_index():
    with pytest.raises(ValueError, match=r"record 2 has 5000 tokens, more than max_len 4096"):
        plan_packs([10, 4096, 5000, 7], 4096)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="record 1 has a negative length"):
        plan_packs([3, -1], 10)
    with pytest.raises(ValueError, match="max_len"):
        plan_packs([3], 0)
    assert plan_packs([], 10) == []


def test_zero_length_records_are_placed():
    lengths = [0, 10, 0, 0]
    packs = plan_packs(lengths, 10)
    assert_valid_plan(packs, lengths, 10)
    assert len(packs) == 1


def test_plan_is_deterministic():
    lengths = random_lengths(5000, 7, high=1000)
    assert plan_packs(lengths, 1000) == plan_packs(list(lengths), 1000)


def test_perfect_fit_uses_the_minimum_number_of_packs():
    # 40 bins of 100, each cut into 1-5 pieces, shuffled: best-fit decreasing finds exactly 40 packs.
    rng = random.Random(3)
    lengths = []
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, 100), rng.randint(0, 4)))
        lengths += [b - a for a, b in zip([0, *cuts], [*cuts, 100])]
    rng.shuffle(lengths)
    packs = plan_packs(lengths, 100)
    assert_valid_plan(packs, lengths, 100)
    assert len(packs) == 40
    assert padding_efficiency([[p] for p in packs], lengths, packed=True, pad_to=100) == 1.0


def test_each_record_goes_into_the_fullest_pack_it_fits():
    # Longest first: 70 and 50 open packs (room 30 and 50); 45 only fits the second (room 5); 30 fills the
    # first exactly; 5 fits only the second.
    lengths = [70, 50, 45, 30, 5]
    assert plan_packs(lengths, 100) == [[0, 3], [1, 2, 4]]


def test_plan_is_fast():
    lengths = random_lengths(200_000, 11, high=4096)
    start = time.perf_counter()
    packs = plan_packs(lengths, 4096)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed:.2f} s for 200k records"
    assert_valid_plan(packs, lengths, 4096)


def test_length_grouped_order_is_a_sorted_permutation_per_megabatch():
    lengths = random_lengths(1037, 5, high=3000)
    order = length_grouped_order(lengths, batch_size=4, seed=0, mega=10)
    assert sorted(order) == list(range(len(lengths)))
    for start in range(0, len(order), 40):
        chunk = [lengths[i] for i in order[start:start + 40]]
        assert chunk == sorted(chunk, reverse=True)
    assert lengths[order[0]] == max(lengths), "the first batch holds the longest record"


def test_length_grouped_order_moves_the_longest_record_to_the_first_batch():
    lengths = [1] * 200
    lengths[150] = 99
    for seed in range(20):  # in most of these seeds record 150 is outside the first megabatch
        order = length_grouped_order(lengths, batch_size=4, seed=seed, mega=2)
        assert order[0] == 150
        assert sorted(order) == list(range(200))


def test_length_grouped_order_depends_on_the_seed_only():
    lengths = random_lengths(500, 9)
    a = length_grouped_order(lengths, batch_size=4, seed=1)
    assert a == length_grouped_order(lengths, batch_size=4, seed=1)
    assert a != length_grouped_order(lengths, batch_size=4, seed=2)
    assert length_grouped_order([], batch_size=4, seed=0) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_order(lengths, batch_size=0, seed=0)


def test_grouping_by_length_reduces_padding():
    lengths = random_lengths(4000, 4, low=50, high=4000)
    naive = [list(range(s, min(s + 4, 4000))) for s in range(0, 4000, 4)]
    order = length_grouped_order(lengths, 4, seed=0)
    grouped = [order[s:s + 4] for s in range(0, 4000, 4)]
    assert padding_efficiency(grouped, lengths, packed=False) > padding_efficiency(naive, lengths, packed=False) + 0.2


def test_padding_efficiency_counts_slots():
    lengths = [10, 30, 20, 5]
    assert padding_efficiency([[0, 1], [2, 3]], lengths, packed=False) == pytest.approx(65 / (60 + 40))
    assert padding_efficiency([[0, 1, 2, 3]], lengths, packed=False, pad_to=40) == pytest.approx(65 / 160)
    packs = [[0, 1], [2, 3]]
    assert padding_efficiency([[p] for p in packs], lengths, packed=True) == 1.0
    assert padding_efficiency([[p] for p in packs], lengths, packed=True, pad_to=40) == pytest.approx(65 / 80)
    assert padding_efficiency([packs], lengths, packed=True) == pytest.approx(65 / 80)
    with pytest.raises(ValueError, match="pad_to=30"):
        padding_efficiency([[p] for p in packs], lengths, packed=True, pad_to=30)
