"""maglev_rounds: unit-weight pools round by round, in stages, and the last turns one by one, each
path checked against Pseudocode 1 literally (tests/oracle.py)."""

from __future__ import annotations

import functools
import random
from ipaddress import IPv4Address

import numpy as np
import pytest

from rusty_rail.core.maglev import build_table
from rusty_rail.core.maglev_rounds import Rounds
from tests.oracle import oracle_maglev


def test_round_by_round_finishes_its_last_moving_turns_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-turn finish must run (and agree with the oracle) on a pool filled round by round."""
    calls = []
    finish = Rounds.finish

    def counted(self, moving, *args):  # noqa: ANN001, ANN202
        calls.append(len(moving))
        return finish(self, moving, *args)

    monkeypatch.setattr(Rounds, "finish", counted)
    rng = random.Random(9)
    for size, n in ((4099, 150), (65537, 120)):
        base = rng.randrange(1 << 24, 1 << 31)
        backends = [str(IPv4Address(base + 7 * i)) for i in range(n)]
        table = build_table(backends, size=size)
        assert [str(table.backends[i]) for i in table.slots.tolist()] == oracle_maglev(backends, size)
    assert calls and max(calls) >= 1




STAGED = 32771, 100  # a table and pool that go in stages of 10 rounds


@functools.lru_cache(maxsize=1)
def staged_case() -> tuple[list[str], list[str]]:
    size, n = STAGED
    backends = [str(IPv4Address(0x0A400001 + 3 * i)) for i in range(n)]
    return backends, oracle_maglev(backends, size)


def count_stages(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Wrap Rounds.stage and .stage_finish: how many stages were done, undone, finished in Python."""
    seen = {True: 0, False: 0, "finish": 0}
    stage, finish = Rounds.stage, Rounds.stage_finish

    def counted_stage(self, t0, rounds):  # noqa: ANN001, ANN202
        done = stage(self, t0, rounds)
        seen[done] += 1
        return done

    def counted_finish(self, *args):  # noqa: ANN001, ANN202
        seen["finish"] += 1
        return finish(self, *args)

    monkeypatch.setattr(Rounds, "stage", counted_stage)
    monkeypatch.setattr(Rounds, "stage_finish", counted_finish)
    return seen


def test_stages_of_many_rounds_match_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_stages(monkeypatch)
    backends, expected = staged_case()
    table = build_table(backends, size=STAGED[0])
    assert [str(table.backends[i]) for i in table.slots.tolist()] == expected
    assert seen[True] >= 20 and seen["finish"] >= 1


def test_a_short_list_undoes_its_stage_and_the_rounds_do_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """No spare list entries: a turn that loses runs off its backend's list, and the stage's claims
    are taken back before the rounds do those turns again."""
    monkeypatch.setattr(Rounds, "STAGE_SPARE", 0)
    seen = count_stages(monkeypatch)
    backends, expected = staged_case()
    table = build_table(backends, size=STAGED[0])
    assert [str(table.backends[i]) for i in table.slots.tolist()] == expected
    assert seen[False] >= 1 and seen[True] >= 1


def test_stage_lists_look_further_for_a_backend_whose_next_entries_are_taken() -> None:
    size, n = 32771, 100
    rng = np.random.default_rng(5)
    offset, skip = rng.integers(0, size, n), rng.integers(1, size, n)
    fill = Rounds(offset, skip, np.ones(n, np.int64), size)
    fill.skip32, fill.cur = skip.astype(np.int32), offset.astype(np.int32)
    listed = (offset[0] + skip[0] * np.arange(400)) % size  # backend 0's next 400 entries
    fill.claim[listed[:100]] = 7  # the first 100 are taken: far more than a look for 20 covers
    cand, count = fill.stage_lists(20, 1.0)
    assert count.min() >= 20 and count.sum() == len(cand)
    first = int(count[0])
    assert cand[:first].tolist() == listed[100:100 + first].tolist()
    others = (offset[1] + skip[1] * np.arange(count[1])) % size
    assert cand[first:first + count[1]].tolist() == others.tolist()


@pytest.mark.parametrize("candidates", [1, 16])
def test_the_last_turns_one_by_one_match_the_oracle(monkeypatch: pytest.MonkeyPatch, candidates: int) -> None:
    """The last round's last turns take their nearest free slots in turn; with one candidate at
    hand most of them find it taken and look at their whole row."""
    monkeypatch.setattr(Rounds, "CANDIDATES", candidates)
    calls = []
    last_turns = Rounds.last_turns
    monkeypatch.setattr(Rounds, "last_turns", lambda self, t0: calls.append(t0) or last_turns(self, t0))
    backends = [str(IPv4Address(0x0A500001 + 5 * i)) for i in range(150)]
    table = build_table(backends, size=4099)  # 4099 % 150 = 49 turns in the last round
    assert [str(table.backends[i]) for i in table.slots.tolist()] == oracle_maglev(backends, 4099)
    assert calls == [4099 - 49]
