"""Task functions for the nested-ownership tests (importable by every worker)."""

from __future__ import annotations

import concurrent.futures
import os
import time

import futurepool


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)


def fib(n, ex):
    if n < 2:
        return n
    a, b = ex.submit(fib, n - 1, ex), ex.submit(fib, n - 2, ex)
    return a.result() + b.result()


def fib_current(n):
    if n < 2:
        return n
    ex = futurepool.current_executor()
    a, b = ex.submit(fib_current, n - 1), ex.submit(fib_current, n - 2)
    return a.result() + b.result()


def fan_out(n):
    ex = futurepool.current_executor()
    futures = [ex.submit(square, i) for i in range(n)]
    return sum(f.result() for f in futures)


def tree_wait(depth, width):
    """Waits with concurrent.futures.wait (the stdlib's), which lends the slot too."""
    if depth == 0:
        return 1
    ex = futurepool.current_executor()
    futures = [ex.submit(tree_wait, depth - 1, width) for _ in range(width)]
    done, not_done = concurrent.futures.wait(futures, timeout=60)
    assert not not_done
    return 1 + sum(f.result() for f in done)


def tree_as_completed(depth, width):
    if depth == 0:
        return 1
    ex = futurepool.current_executor()
    futures = [ex.submit(tree_as_completed, depth - 1, width) for _ in range(width)]
    return 1 + sum(f.result() for f in concurrent.futures.as_completed(futures, timeout=60))


def mapped(n):
    return sum(futurepool.current_executor().map(square, range(n), timeout=60))


def chained():
    """A nested future passed to a further nested task: the value goes worker to worker."""
    ex = futurepool.current_executor()
    a = ex.submit(square, 3)
    b = ex.submit(add, a, 1)
    c = ex.submit(add, [a], [b])  # inside a container too
    return b.result(), c.result()


def child_fails():
    ex = futurepool.current_executor()
    return ex.submit(fail, "from a child").result()


def child_error_as_value():
    ex = futurepool.current_executor()
    future = ex.submit(fail, "kept")
    return repr(future.exception(timeout=60))


def returns_future(x):
    return futurepool.current_executor().submit(square, x)


def returns_futures(x):
    ex = futurepool.current_executor()
    return {"a": ex.submit(square, x), "b": [ex.submit(square, x + 1)]}


def returns_slow_future(x, seconds):
    return futurepool.current_executor().submit(sleep_then, x, seconds), os.getpid()


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def resolve(future):
    """A future another task returned, handed to this task: it borrows it."""
    return future.result(timeout=60) + 1


def big_child(nbytes):
    """A child's result large enough for the store; the parent reads it."""
    ex = futurepool.current_executor()
    return len(ex.submit(make_bytes, nbytes).result())


def make_bytes(nbytes):
    return b"x" * nbytes


def returns_big_future(nbytes):
    return futurepool.current_executor().submit(make_bytes, nbytes)


def put_and_share(n):
    ex = futurepool.current_executor()
    shared = ex.put(list(range(n)))
    return sum(f.result() for f in [ex.submit(sum, shared) for _ in range(3)])


def parent_of_sleepers(directory, count, seconds):
    """Submits sleepers that note when they finish, then waits for them."""
    ex = futurepool.current_executor()
    futures = [ex.submit(noted_sleep, directory, i, seconds) for i in range(count)]
    return sum(f.result() for f in futures)


def noted_sleep(directory, index, seconds):
    with open(os.path.join(directory, f"started-{index}"), "w"):
        pass
    time.sleep(seconds)
    with open(os.path.join(directory, f"finished-{index}"), "w"):
        pass
    return 1


def parent_dies(directory, count, seconds):
    """Submits sleepers, then its worker dies: the owner is gone."""
    ex = futurepool.current_executor()
    futures = [ex.submit(noted_sleep, directory, i, seconds) for i in range(count)]
    marker = os.path.join(directory, "attempt")
    attempt = 1 if not os.path.exists(marker) else 2
    with open(marker, "w") as file:
        file.write(str(attempt))
    if attempt == 1:
        time.sleep(0.3)  # the children are placed
        os._exit(17)
    return sum(f.result() for f in futures), attempt


def getpid():
    return os.getpid()


def current_executor_repr():
    return repr(futurepool.current_executor())


def pickle_executor(ex):
    import pickle
    pickle.dumps(ex)


def submit_count(n):
    """n no-op children, in batches, summed: the driver must not hold their entries."""
    ex = futurepool.current_executor()
    total = 0
    for start in range(0, n, 1000):
        batch = [ex.submit(square, 1) for _ in range(start, min(n, start + 1000))]
        total += sum(f.result() for f in batch)
    return total


def borrow_note_and_die(future, note):
    """Borrows a future another task returned, notes where its value is stored, dies."""
    value = future.result(timeout=60)
    inband, pieces = future._encoded
    names = [piece.location.name for piece in (inband, *pieces) if hasattr(piece, "location")]
    with open(note, "w") as file:
        file.write("\n".join(names))
    assert len(value) > 0
    os._exit(3)


def tree_dies_once(depth, directory):
    """A tree of nested tasks whose worker dies once, two levels down."""
    ex = futurepool.current_executor()
    if depth == 0:
        marker = os.path.join(directory, "died")
        if not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(9)
        return 1
    futures = [ex.submit(tree_dies_once, depth - 1, directory) for _ in range(2)]
    return 1 + sum(f.result(timeout=60) for f in futures)


def submit_through(view, x):
    """``view`` is an ``options()`` view of the executor, passed to the task."""
    return view.submit(square, x).result(timeout=60), repr(view)


def slow_value(x, seconds):
    time.sleep(seconds)
    return x


def concat(a, b):
    return a + b


def reduce_children(n):
    """Inside a task: reduce nested futures as they complete."""
    ex = futurepool.current_executor()
    futures = [ex.submit(square, i) for i in range(n)]
    return futurepool.reduce_as_completed(ex, add, futures).result(timeout=60)


def concat_strings(a, b):
    return "" + a + b  # ints: TypeError


def chain(n):
    """Each task waits for the next: n tasks blocked on one another."""
    if n == 0:
        return 0
    return futurepool.current_executor().submit(chain, n - 1).result(timeout=120) + 1


def initializer_submits():
    futurepool.current_executor()


def big_children(count, nbytes):
    """Children with stored results, read by the parent wherever each ran; and where."""
    ex = futurepool.current_executor()
    futures = [ex.submit(made_where, nbytes) for _ in range(count)]
    places = set()
    total = 0
    for future in futures:
        value, place = future.result(timeout=60)
        total += len(value)
        places.add(place)
    return total, sorted(places), os.readlink("/proc/self/ns/net")


def made_where(nbytes):
    time.sleep(0.2)  # long enough for the children to spread over the hosts
    return bytearray(nbytes), os.readlink("/proc/self/ns/net")
