"""Pipeline schedules (no MPI): every schedule simulates without deadlock at any P and m,
holds what it promises, and a broken one is an error before anything is sent."""

import pytest

from mpitrain.parallel.schedule import SCHEDULES, ScheduleError, one_f_one_b, promised, simulate


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
def test_schedules_run_and_hold_what_they_promise(name, stages, m):
    lists = [SCHEDULES[name](s, stages, m) for s in range(stages)]
    peak = simulate(lists, m)
    assert peak == [promised(name, s, stages, m) for s in range(stages)]


def test_1f1b_holds_fewer_than_gpipe():
    assert one_f_one_b(0, 4, 8)[:4] == [("F", 0), ("F", 1), ("F", 2), ("F", 3)]
    assert simulate([one_f_one_b(s, 4, 8) for s in range(4)], 8) == [4, 3, 2, 1]


def test_a_broken_schedule_is_an_error_not_a_hang():
    lists = [one_f_one_b(s, 3, 4) for s in range(3)]
    lists[1] = lists[1][::-1]  # stage 1 starts with a backward nobody can feed
    with pytest.raises(ScheduleError, match="before its forward|deadlocks"):
        simulate(lists, 4)
    swapped = [one_f_one_b(s, 2, 2) for s in range(2)]
    swapped[1] = [("B", 0), ("F", 0), ("F", 1), ("B", 1)]
    with pytest.raises(ScheduleError):
        simulate(swapped, 2)
    crossed = [[("F", 0), ("B", 0), ("F", 1), ("B", 1)], [("F", 1), ("B", 1), ("F", 0), ("B", 0)]]
    with pytest.raises(ScheduleError, match="deadlocks: stage 0 at B0, stage 1 at F1"):
        simulate(crossed, 2)
    with pytest.raises(ScheduleError, match="one forward and one backward"):
        simulate([[("F", 0)], [("F", 0), ("B", 0)]], 1)
