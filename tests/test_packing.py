"""Packing: how a backlog becomes digests and a long message becomes parts. Pure functions,
tested without threads, servers or rendering."""

import itertools

from alertbridge import chunk_lengths, cut, longest_that_fits, split_in_two


def test_items_are_packed_greedily_in_order_into_runs_that_fit():
    assert list(chunk_lengths([4, 4, 4, 4], 10)) == [2, 2]
    assert list(chunk_lengths([3, 3, 3, 3], 10)) == [3, 1]
    assert list(chunk_lengths([5, 5], 10)) == [2]  # exactly full
    assert list(chunk_lengths([1, 9, 1], 10)) == [2, 1]  # order kept, no reshuffling
    assert list(chunk_lengths([], 10)) == []


def test_an_item_larger_than_the_room_is_a_run_of_its_own():
    assert list(chunk_lengths([3, 25, 3], 10)) == [1, 1, 1]
    assert list(chunk_lengths([25], 10)) == [1]


def test_a_digest_reads_only_what_it_takes_and_one_more():
    read = []

    def sizes():
        for n in itertools.count():
            read.append(n)
            yield 4

    assert next(chunk_lengths(sizes(), 10)) == 2
    assert read == [0, 1, 2]  # message bodies are read lazily, as few as possible


def test_cut_and_halve_keep_every_item_in_order():
    items = list(range(7))
    assert cut(items, [3, 3, 1]) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sum(cut(items, chunk_lengths([2] * 7, 5)), []) == items
    assert split_in_two(items) == [[0, 1, 2], [3, 4, 5, 6]]


def test_the_estimate_is_checked_against_the_real_size_one_item_less_at_a_time():
    fits = lambda prefix: sum(prefix) <= 10  # noqa: E731 (the real rendering, in small)
    assert longest_that_fits([4, 4, 4], fits) == [4, 4]
    assert longest_that_fits([4, 4], fits) == [4, 4]
    assert longest_that_fits([30, 1], fits) == [30]  # at least one: it will be cut or split
