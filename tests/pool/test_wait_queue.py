"""`WaitQueue`: FIFO within a group, round robin between groups, expiry per group, removal anywhere."""

from __future__ import annotations

import pytest

from halephant.pool.pool import WaitQueue


def test_single_group_is_fifo() -> None:
    q: WaitQueue[int] = WaitQueue()
    for i in range(5):
        q.append(i, "a")
    assert [q.popleft() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not q and len(q) == 0


def test_round_robin_between_groups() -> None:
    q: WaitQueue[str] = WaitQueue()
    for i in range(500):
        q.append(f"a{i}", "a")
    for i in range(5):
        q.append(f"b{i}", "b")
    served = [q.popleft() for _ in range(10)]
    assert served == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    assert len(q) == 495 and q.popleft() == "a5"


def test_a_group_that_comes_back_joins_at_the_end() -> None:
    q: WaitQueue[str] = WaitQueue()
    q.append("a0", "a")
    q.append("b0", "b")
    assert q.popleft() == "a0"
    q.append("a1", "a")
    q.append("c0", "c")
    assert [q.popleft() for _ in range(3)] == ["b0", "a1", "c0"]


def test_remove_and_iteration_and_heads() -> None:
    q: WaitQueue[str] = WaitQueue()
    for w, g in [("a0", "a"), ("b0", "b"), ("a1", "a")]:
        q.append(w, g)
    assert sorted(q) == ["a0", "a1", "b0"] and "b0" in q
    assert sorted(q.heads()) == ["a0", "b0"]
    q.remove("b0")
    assert len(q) == 2 and q.heads() == ["a0"]
    with pytest.raises(ValueError):
        q.remove("b0")
    q.clear()
    assert not q and list(q) == []


def test_pop_while_takes_expired_heads_of_every_group() -> None:
    q: WaitQueue[int] = WaitQueue()
    for w in (1, 2, 9):
        q.append(w, "a")
    for w in (3, 8):
        q.append(w, "b")
    assert sorted(q.pop_while(lambda w: w < 5)) == [1, 2, 3]
    assert len(q) == 2 and sorted(q) == [8, 9]
    assert sorted(q.pop_while(lambda w: True)) == [8, 9]
    assert not q
