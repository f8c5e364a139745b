"""Task functions the benchmarks submit.

They live in an importable module, not in ``__main__``, so that every
implementation pickles them by reference (module + qualified name) whatever
its start method: fork, spawn, forkserver, loky's fork+exec, or a worker
started as a separate program. ``bench_*.py`` put this directory on
``sys.path`` and on ``PYTHONPATH`` so that workers can import it too.
"""


def noop():
    """Do nothing: measures pure per-task overhead."""
    return None


def square(x):
    return x * x


def inc(x):
    """Add 1. In the chain scenario ``x`` may arrive as the value of a future."""
    return x + 1


def payload(size):
    """``size`` bytes: a result heavy enough for the driver's memory to notice."""
    return b"x" * size
