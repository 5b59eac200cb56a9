"""Pipeline schedules as instruction lists, and their simulation (no MPI, no torch).

A schedule gives each stage s of P the list of its actions for one step of m micro-batches:
("F", i) runs the forward of micro-batch i (receiving its activation from stage s - 1
unless s = 0, sending the output to s + 1 unless s = P - 1), ("B", i) its backward
(receiving the output's gradient from s + 1 unless s = P - 1, sending the input's
gradient to s - 1 unless s = 0). Sends never block (MPI_Isend, completed at the step's
end); a receive blocks until the neighbour has sent that message.

`simulate` runs every stage's list against the others before the first send, so a
schedule that would deadlock or leave a message unmatched is an error at set-up, never a
hang, and it counts the micro-batches whose activations each stage holds at once.

    GPipe (Huang et al. 2019): all m forwards, then all m backwards: holds m.
    1F1B (PipeDream-Flush, Narayanan et al. 2021): P - s - 1 forwards to fill the pipe,
        then one forward and one backward in turn, then the remaining backwards:
        holds at most min(P - s, m). The same bubble, (P - 1) / (m + P - 1) of a step.
"""

from __future__ import annotations

Action = tuple[str, int]


class ScheduleError(Exception):
    """A schedule that would deadlock, or whose messages do not match."""


def gpipe(stage: int, stages: int, m: int) -> list[Action]:
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(stage: int, stages: int, m: int) -> list[Action]:
    warmup = min(stages - stage - 1, m)
    actions: list[Action] = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < m:
        actions += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    return actions + [("B", i) for i in range(b, m)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def promised(name: str, stage: int, stages: int, m: int) -> int:
    """The most micro-batches whose activations `stage` holds at once under the schedule."""
    return m if name == "gpipe" else min(stages - stage, m)


def _needs(stage: int, stages: int, action: Action):
    """The message an action receives first: (from stage, kind, micro-batch) or None."""
    kind, i = action
    if kind == "F":
        return (stage - 1, "act", i) if stage > 0 else None
    return (stage + 1, "grad", i) if stage < stages - 1 else None


def _sends(stage: int, stages: int, action: Action):
    """The message an action sends: (to stage, kind, micro-batch) or None."""
    kind, i = action
    if kind == "F":
        return (stage + 1, "act", i) if stage < stages - 1 else None
    return (stage - 1, "grad", i) if stage > 0 else None


def simulate(lists: list[list[Action]], m: int) -> list[int]:
    """Run the stages' action lists against each other; return the most micro-batches each
    stage holds activations for at once. ScheduleError names the first problem: an action
    twice or missing, a backward before its forward, a deadlock (the actions each stuck
    stage waits in), a message never received."""
    stages = len(lists)
    for s, actions in enumerate(lists):
        want = sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        if sorted(actions) != want:
            raise ScheduleError(f"stage {s}: the actions are not one forward and one backward of each of "
                                f"{m} micro-batches")
    sent: set = set()  # (from, to, kind, i) sent and not yet received
    pos, held, peak = [0] * stages, [0] * stages, [0] * stages
    done_f = [set() for _ in range(stages)]
    while any(p < len(a) for p, a in zip(pos, lists)):
        moved = False
        for s, actions in enumerate(lists):
            while pos[s] < len(actions):
                action = actions[pos[s]]
                need = _needs(s, stages, action)
                if need is not None and (need[0], s, need[1], need[2]) not in sent:
                    break
                if action[0] == "B" and action[1] not in done_f[s]:
                    raise ScheduleError(f"stage {s}: backward of micro-batch {action[1]} before its forward")
                if need is not None:
                    sent.discard((need[0], s, need[1], need[2]))
                out = _sends(s, stages, action)
                if out is not None:
                    sent.add((s, out[0], out[1], out[2]))
                if action[0] == "F":
                    done_f[s].add(action[1])
                    held[s] += 1
                    peak[s] = max(peak[s], held[s])
                else:
                    held[s] -= 1
                pos[s] += 1
                moved = True
        if not moved:
            stuck = ", ".join(f"stage {s} at {a[pos[s]][0]}{a[pos[s]][1]}" for s, a in enumerate(lists)
                              if pos[s] < len(a))
            raise ScheduleError(f"the schedule deadlocks: {stuck} wait for messages never sent")
    if sent:
        f, t, kind, i = sorted(sent)[0]
        raise ScheduleError(f"stage {f}'s {kind} of micro-batch {i} to stage {t} is never received")
    return peak
