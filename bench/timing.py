"""Interleaved timing: every case runs once per round, rounds repeat, medians are kept.

On a machine shared with other work the load drifts over minutes; running the cases in
alternation (and in a rotating order) exposes all of them to the same drift, so their ratios
stay meaningful even when the absolute numbers move. Backend-free: the cases are callables
that block until their work is done.
"""

import statistics
import time

# A single matmul of a model's MLP shape takes milliseconds: too short to time against model
# steps of seconds (on the 2-core CPU one call measured 35-100% of the sustained rate; on a GPU
# dispatch and synchronization show). The matmul reference cases of bench/model.py and
# bench/gpu.py run this many per timed call, each with its own operands, and divide the time.
MATMULS_PER_CALL = 10


def interleaved_medians(cases, *, repeats, warmup=1, on_round=None):
    """Times each case `repeats` times in alternation after `warmup` untimed calls.

    Args:
        cases: {name: callable()} each running one step to completion (synchronized).
        repeats: timed rounds; each round calls every case once, the order rotating by one
            case per round so no case always follows the same neighbour.
        warmup: untimed calls of each case first (tracing, compilation, allocator warm-up).
        on_round: optional callable(round_index, {name: seconds}) for progress logging.

    Returns:
        {name: median seconds per call}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        this_round = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            this_round[name] = time.perf_counter() - start
            times[name].append(this_round[name])
        if on_round:
            on_round(round_index, this_round)
    return {name: statistics.median(values) for name, values in times.items()}
