"""Task functions of ``bench_nested.py``: tasks that submit tasks.

One module for every system, importable by their workers (``bench_nested.py``
puts this folder on ``PYTHONPATH``), so that each pickles them by reference.
The same recursion is written once per system, the way its users write it:

* futurepool: the task gets the executor as an argument (``fib(n, ex)``, as in
  issue 11) and submits through it; the futures it makes are its own.
* Ray: ``@ray.remote`` functions that call ``.remote()`` and ``ray.get``
  inside (Ray releases the task's CPU while it blocks in ``ray.get``).
* Dask distributed: ``with worker_client() as client:`` inside the task
  (the task secedes from its worker's thread pool while it waits).

Ray's remote functions are made on first use in each process (``_ray``), not
at import, so that importing this module never imports Ray (futurepool's and
Dask's workers import it too).
"""

from __future__ import annotations


def fib_tasks(n: int) -> int:
    """How many tasks ``fib(n)`` runs: one per call of the recursion."""
    return 1 if n < 2 else 1 + fib_tasks(n - 1) + fib_tasks(n - 2)


def fib_value(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def one() -> int:
    """A fan-out child: returns 1, so the parent's sum counts its children."""
    return 1


# --- futurepool ----------------------------------------------------------------------


def fib(n, ex):
    """Issue 11's example, verbatim."""
    if n < 2:
        return n
    a, b = ex.submit(fib, n - 1, ex), ex.submit(fib, n - 2, ex)
    return a.result() + b.result()


def fan_out(n, ex):
    """Submit ``n`` children, then sum their results (in submission order)."""
    futures = [ex.submit(one) for _ in range(n)]
    return sum(f.result() for f in futures)


def fan_out_batches(n, batch):
    """``n`` children in batches of ``batch`` through ``current_executor()``:
    submit a batch, sum it, drop its futures, then the next."""
    import futurepool

    ex = futurepool.current_executor()
    total = 0
    for start in range(0, n, batch):
        futures = [ex.submit(one) for _ in range(min(batch, n - start))]
        total += sum(f.result() for f in futures)
    return total


# --- Ray -------------------------------------------------------------------------------

#: This process's Ray remote functions, by name (made by ``_ray``).
_RAY: dict = {}


def _ray():
    if not _RAY:
        import ray

        _RAY["fib"] = ray.remote(ray_fib)
        _RAY["one"] = ray.remote(one)
        _RAY["fan_out"] = ray.remote(ray_fan_out)
    return _RAY


def ray_fib(n):
    """``fib`` as a Ray task: ``ray.get([fib.remote(n - 1), fib.remote(n - 2)])``."""
    if n < 2:
        return n
    import ray

    fib_remote = _ray()["fib"]
    return sum(ray.get([fib_remote.remote(n - 1), fib_remote.remote(n - 2)]))


def ray_fan_out(n):
    import ray

    one_remote = _ray()["one"]
    return sum(ray.get([one_remote.remote() for _ in range(n)]))


# --- Dask distributed ----------------------------------------------------------------


def dask_fib(n):
    """``fib`` as a Dask task: submits through ``worker_client()`` and gathers."""
    if n < 2:
        return n
    from distributed import worker_client

    with worker_client() as client:
        a = client.submit(dask_fib, n - 1, pure=False)
        b = client.submit(dask_fib, n - 2, pure=False)
        return sum(client.gather([a, b]))


def dask_fan_out(n):
    from distributed import worker_client

    with worker_client() as client:
        futures = [client.submit(one, pure=False) for _ in range(n)]
        return sum(client.gather(futures))
