"""Real clients of the executor: libraries that take any ``concurrent.futures.Executor``.

Dask runs a graph on any executor handed to it as the scheduler
(``dask.compute(x, scheduler=executor)``): its local scheduler submits the
graph's tasks with ``executor.submit``, as many at a time as the executor's
``_max_workers``. Each computation must give futurepool's executor the
results the stdlib's ``ProcessPoolExecutor`` gives: the same values of the
same types. Behaviour only; ``benchmarks/bench_dask_client.py`` times it.

The computations run in a script in a fresh interpreter, as a user runs
them: importing ``dask.multiprocessing`` installs tblib's exception
pickling for the whole process, which forked workers of later tests in the
same pytest process would inherit.

Skipped when Dask (with its array and bag parts) is not installed:
``pip install '.[test]'`` installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

# Found, not imported: importing dask.bag imports dask.multiprocessing, which
# installs tblib's exception pickling in this process for good.
if any(importlib.util.find_spec(name) is None for name in ("dask", "numpy", "toolz")):
    pytest.skip("Dask with its array and bag parts is not installed", allow_module_level=True)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Seconds the whole script may take (each executor starts its workers once).
TIMEOUT = 120.0

_SCRIPT = """
import concurrent.futures as cf
import json, multiprocessing, sys
import dask, dask.array as da, dask.bag as db
import futurepool

N, M = 100_000, 10_000

def multiple_of_three(x):
    # A function of the script itself, as in a user's script.
    return x % 3 == 0

def collections():
    return {"array_sum": da.arange(N, chunks=N // 8).sum(),
            "bag_count": db.from_sequence(range(M), npartitions=4).filter(
                multiple_of_three).count()}

def run(executor):
    # Twice on one executor: the second compute finds its workers warm.
    out = {}
    for name, collection in collections().items():
        values = [dask.compute(collection, scheduler=executor)[0] for _ in range(2)]
        out[name] = [[type(v).__module__ + "." + type(v).__qualname__, int(v)] for v in values]
    return out

if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    with cf.ProcessPoolExecutor(2, mp_context=context) as pool:
        stdlib = run(pool)
    with futurepool.Executor(2, mp_context=context) as executor:
        ours = run(executor)
    print(json.dumps({"stdlib": stdlib, "futurepool": ours}))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dask_computes_the_stdlibs_result(tmp_path, method):
    script = tmp_path / "dask_client.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), method], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=_REPO))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["futurepool"] == out["stdlib"]
    n, m = 100_000, 10_000
    assert [v for _, v in out["stdlib"]["array_sum"]] == [n * (n - 1) // 2] * 2
    assert [v for _, v in out["stdlib"]["bag_count"]] == [(m + 2) // 3] * 2
