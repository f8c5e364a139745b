"""futurepool: scale ``concurrent.futures`` and ``multiprocessing`` code out.

``futurepool.Executor`` (also exported as ``ProcessPoolExecutor``) is a
drop-in ``concurrent.futures.ProcessPoolExecutor`` whose futures can be
passed to other tasks. See README.md for the differences from the stdlib.
"""

from .errors import (
    FuturePoolError,
    InitializerError,
    ObjectLostError,
    ObjectStoreFullError,
    RemoteError,
    ResultPicklingError,
    UnpicklingFailedError,
    WorkerCrashedError,
)
from .executor import Executor, ProcessPoolExecutor
from .future import Future
from .pool import Pool

__version__ = "0.1.0"

__all__ = [
    "Executor",
    "Future",
    "FuturePoolError",
    "InitializerError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "Pool",
    "ProcessPoolExecutor",
    "RemoteError",
    "ResultPicklingError",
    "UnpicklingFailedError",
    "WorkerCrashedError",
]
