"""CPython's own ``multiprocessing.Pool`` tests, fork start method, run on futurepool.Pool.

See ``_cpython_pool.py`` for how they are bound and what is skipped.
"""

from __future__ import annotations

from ._cpython_pool import bind

globals().update(bind("fork", __name__))
