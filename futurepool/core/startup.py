"""How workers get the caller's code and state: the stdlib's start methods.

futurepool honours the start method of ``mp_context`` (``Pool``'s
``context``) the way ``multiprocessing`` does, because code written for the
stdlib relies on it:

* **fork** (the default on Linux before Python 3.14). The node is forked
  from the driver when the executor starts (in the thread that first submits,
  before futurepool starts a thread of its own), and workers are forked from
  the node. Workers therefore see the driver's memory as it was at that
  moment, as the stdlib's forked workers do: the main script's module state,
  ``multiprocessing`` objects of the default context passed in ``initargs``
  (Queue, Lock, Event, Value, ...), modules already imported. The
  initializer and its arguments are handed over in memory, never pickled.
  Functions and classes that were attributes of ``__main__`` at that moment
  travel by reference, so they share the script's globals with the
  initializer; anything newer (defined later, lambdas, closures) travels by
  value. A worker replaced after a crash is forked from the node, so it sees
  the same snapshot, not the driver's later state.
* **spawn** and **forkserver**. The node is a fresh interpreter and each
  worker imports the main script as ``__mp_main__`` before it takes a task,
  with the driver's ``sys.path``, ``sys.argv`` and working directory, as the
  stdlib's spawned workers do (so the ``if __name__ == "__main__":`` guard
  matters: :func:`check_not_importing_main`). Functions and classes defined
  at the top level of the main script travel by reference and share its
  globals; the rest travels by value. Workers start on demand, one per
  submit that finds no idle worker, up to ``max_workers``.
* **Remote hosts** (the cluster) get spawn semantics: no host but the
  driver's has its memory. The main script's source is shipped and imported
  there as ``__mp_main__``; other modules must be importable there, and a
  task whose module is missing fails with an error naming the module and the
  node. What only exists by fork (a fork-context Lock, a Queue's pipe) cannot
  cross hosts, and says so when pickled.

Fork hazards are the stdlib's: a lock held by another thread of the driver
at the moment of the fork stays held in the workers. futurepool forks the
node before it starts its own threads, and the node runs no user code.
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import multiprocessing.process
import multiprocessing.spawn
import multiprocessing.util
import os
import sys
import types

#: Semantics of each start method (anything else is refused by mp.get_context).
FORK, SPAWN = "fork", "spawn"

_GUARD_MESSAGE = (
    "{what} was started while {where} was being imported by a worker process. With the"
    " '{method}' start method each worker imports the main script (as the stdlib's"
    " spawned workers do), so module-level code that creates an executor or a pool runs"
    " again in every worker. Put that code under the main-module guard:\n\n"
    "    if __name__ == \"__main__\":\n"
    "        ...\n\n"
    "See \"Safe importing of main module\" in the multiprocessing documentation.")


def semantics(context) -> str:
    """FORK or SPAWN for a ``multiprocessing`` context (forkserver imports like spawn)."""
    method = context.get_start_method() if context is not None else None
    if method is None:
        method = multiprocessing.get_start_method()
    return FORK if method == "fork" else SPAWN


# --- which __main__ objects travel by reference ------------------------------

class MainReferences:
    """Decides whether a function or class of ``__main__`` can travel by name.

    By name means the worker looks it up in its own ``__main__`` (the forked
    copy, or the script imported as ``__mp_main__``) and so shares that
    module's globals with the initializer and every other task, exactly as
    with the stdlib. It must then exist there as the same definition:
    under fork semantics, the object ``__main__`` held when the node was
    forked; under spawn semantics, a ``def``/``class`` at the top level of
    the script (not inside the ``if __name__ == "__main__":`` block, which
    workers do not run).
    """

    def __init__(self, snapshot: dict | None, top_level: frozenset | None = None):
        self._snapshot = snapshot
        self._top_level = top_level  # None: no script to import (with a snapshot: no check)

    @classmethod
    def for_fork(cls, importable: bool = False) -> MainReferences:
        """What the node is about to inherit: ``__main__``'s functions and classes now.

        ``importable``: also hosts that import the script (a cluster's remote
        nodes) must find it, so it must be defined at the script's top level too.
        """
        main = sys.modules.get("__main__")
        names = {name: value for name, value in vars(main).items()
                 if type(value) is types.FunctionType or isinstance(value, type)} \
            if main is not None else {}
        return cls(names, cls.for_spawn()._top_level or frozenset() if importable else None)

    @classmethod
    def for_spawn(cls) -> MainReferences:
        """What importing the main script defines unconditionally at its top level.

        Nothing when there is no script to import (an interactive session,
        ``python -c``): then everything of ``__main__`` travels by value.
        """
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if path is None or path.endswith(("ipython", "<stdin>")):
            return cls(None, frozenset())
        return cls(None, _top_level_definitions(os.path.abspath(path)))

    def __call__(self, obj) -> bool:
        name = obj.__qualname__
        if self._snapshot is not None:
            if self._snapshot.get(name) is not obj:
                return False
            return self._top_level is None or name in self._top_level
        return name in self._top_level \
            and getattr(sys.modules.get("__main__"), name, None) is obj


@functools.lru_cache(maxsize=8)
def _top_level_definitions(path: str) -> frozenset:
    """Names a script defines with ``def``/``class`` at its top level, outside any block."""
    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return frozenset(node.name for node in tree.body if isinstance(node, kinds))


# --- spawn semantics ----------------------------------------------------------

def preparation_data(name: str, method: str = "spawn") -> dict:
    """What a worker needs to import the main script as the stdlib's spawned children do."""
    data = multiprocessing.spawn.get_preparation_data(name)
    data["start_method"] = method
    data.pop("authkey", None)  # sent separately; the node sets it for every worker
    data.pop("name", None)  # each worker has its own
    return data


def prepare_main(data: dict) -> None:
    """In a worker: import the main script as ``__mp_main__`` (spawn semantics).

    While it runs, starting an executor or a pool raises the guard error
    (:func:`check_not_importing_main`), as the stdlib's ``_inheriting`` flag does.
    """
    with importing("the main script"):
        multiprocessing.spawn.prepare(data)


class importing:
    """Context: this worker is importing user code (the main script, a task's module)."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        process = multiprocessing.process.current_process()
        self.before = getattr(process, "_inheriting", False), getattr(process, "_fp_where", None)
        process._inheriting = True
        process._fp_where = self.where

    def __exit__(self, *exc_info):
        process = multiprocessing.process.current_process()
        process._inheriting, process._fp_where = self.before


def check_not_importing_main(what: str) -> None:
    """Raise the guard error if this process is a worker importing user code."""
    process = multiprocessing.process.current_process()
    if getattr(process, "_inheriting", False):
        where = getattr(process, "_fp_where", None) or "the main script"
        raise RuntimeError(_GUARD_MESSAGE.format(
            what=what, where=where, method=multiprocessing.get_start_method(allow_none=True)
            or "spawn"))


# --- in a freshly forked worker -----------------------------------------------

def become_worker_process(name: str, parent_pid: int) -> None:
    """Give a worker the ``multiprocessing`` identity the stdlib's workers have.

    ``current_process()`` becomes a process object named ``name`` (not the
    driver's ``MainProcess``); as ``BaseProcess._bootstrap`` does after a
    fork, the driver's ``multiprocessing`` finalizers are forgotten (they
    belong to the driver: a Queue's feeder thread does not exist here) and
    the after-fork hooks of ``multiprocessing`` objects run; stdin is closed.
    """
    process_module = multiprocessing.process
    me = process_module.BaseProcess(name=name)
    me._parent_pid = parent_pid
    me._parent_name = "MainProcess"
    process_module._current_process = me
    process_module._children = set()
    multiprocessing.util._finalizer_registry.clear()
    multiprocessing.util._run_after_forkers()
    multiprocessing.util._close_stdin()
