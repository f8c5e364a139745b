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


# --- bench_store.py: NumPy arrays in and out -------------------------------------
#
# NumPy is imported inside the functions, not here: the other benchmarks'
# workers import this module too, and bench_executor's start-up time must not
# include NumPy's import.

#: Arrays a worker has built, by (nbytes, index): what ``cached_array`` returns.
_CACHE = {}


def cached_array(nbytes, index=0):
    """A float64 array of ``nbytes`` bytes, every element ``index``.

    Built on the first call in each worker process and kept in ``_CACHE``, so
    that a timed call returns an array that already exists: the benchmark
    measures moving it, not building it.
    """
    key = (nbytes, index)
    a = _CACHE.get(key)
    if a is None:
        import numpy as np

        a = _CACHE[key] = np.full(nbytes // 8, float(index))
    return a


def fill_cache(nbytes, count):
    """Build ``cached_array(nbytes, i)`` for i in range(count); return nothing."""
    for i in range(count):
        cached_array(nbytes, i)


def on_worker(fn, *args):
    """``(pid, fn(*args))``, after a short pause.

    Warm-ups submit one per worker at a time: the pause keeps a worker busy
    long enough for the next call to go to another one, and the pid says
    which worker ran it, until every worker has.
    """
    import os
    import time

    result = fn(*args)
    time.sleep(0.02)
    return os.getpid(), result


def total(a):
    """The sum of an array: reads every element of an argument moved to the worker."""
    return float(a.sum())


def ends(a):
    """Read an array lightly: first element + last element + length."""
    return float(a[0] + a[-1] + len(a))


def total_all(*arrays):
    """The sum of every element of every array."""
    return sum(float(a.sum()) for a in arrays)


def _note_start(path):
    """Write when this task started (the system-wide monotonic clock) to ``path``."""
    import time

    with open(path, "w") as file:
        file.write(repr(time.monotonic()))


def spin_noting_start(path):
    """A pure-Python loop that never ends (bench_control: stopped by its timeout)."""
    _note_start(path)
    while True:
        pass


def sleep_noting_start(path):
    """A long ``time.sleep`` (bench_control: interrupted by its timeout)."""
    import time

    _note_start(path)
    time.sleep(3600)


def swallow_noting_start(path):
    """Catches every interrupt and sleeps on (bench_control: its worker is killed)."""
    import time

    _note_start(path)
    while True:
        try:
            time.sleep(3600)
        except BaseException:  # noqa: BLE001, S110 - the point of the task
            pass


def make_array(nbytes):
    """A large result (bench_cluster objects): it stays in its node's store."""
    import numpy as np

    return np.ones(nbytes // 8, dtype=np.float64)


def sum_and_return(array):
    """The sum of a pulled array, and the array itself, back to the driver."""
    return float(array.sum()), array


def hold(seconds):
    """Keeps a worker busy (bench_cluster objects: the next task goes to another node)."""
    import time

    time.sleep(seconds)
