"""Placement by locality on loopback (no namespaces needed): a ``put`` value lives in
the head's store, so tasks over it run on the head's workers while they have room."""

from __future__ import annotations

import time

import futurepool

from ._nodes import TIMEOUT, joined, start_worker, stop
from ._objects import pid_of

MB = 1_000_000


def test_a_map_over_a_put_value_runs_where_the_value_is(key_file):
    with futurepool.Executor(2, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 4)
            local = set(executor._processes)
            value = executor.put(bytearray(10 * MB))
            assert all(executor.submit(pid_of, value).result(timeout=TIMEOUT) in local
                       for _ in range(4))
            assert set(executor.map(pid_of, [value] * 2, [0.3] * 2, timeout=TIMEOUT)) <= local
            assert not executor._owner.objects.copies, "nothing needed to move"
            # The head's two workers busy: the next task runs on the node, which pulls.
            busy = [executor.submit(pid_of, value, 2.0) for _ in range(2)]
            time.sleep(0.3)
            assert executor.submit(pid_of, value).result(timeout=TIMEOUT) not in local
            assert {f.result(timeout=TIMEOUT) for f in busy} <= local
            assert len(executor._owner.objects.copies) == 1
        finally:
            stop(proc)
