"""futurepool: scale ``concurrent.futures`` and ``multiprocessing`` code out.

``futurepool.Executor`` (also exported as ``ProcessPoolExecutor``) is a
drop-in ``concurrent.futures.ProcessPoolExecutor`` whose futures can be
passed to other tasks. See README.md for the differences from the stdlib.
"""

# Before the imports: modules below read it while the package is being imported.
__version__ = "0.1.0"

from .errors import (  # noqa: E402
    FuturePoolError,
    InitializerError,
    ObjectLostError,
    ObjectStoreFullError,
    OwnerDiedError,
    RemoteError,
    ResultPicklingError,
    TaskMemoryError,
    TaskTimeoutError,
    UnpicklingFailedError,
    UnsatisfiableResourcesError,
    WorkerCrashedError,
)
from .executor import Executor, ProcessPoolExecutor, current_executor  # noqa: E402
from .future import Future  # noqa: E402
from .pool import Pool  # noqa: E402
from .progress import as_completed  # noqa: E402
from .reduce import reduce_as_completed  # noqa: E402

__all__ = [
    "Executor",
    "Future",
    "FuturePoolError",
    "InitializerError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "OwnerDiedError",
    "Pool",
    "ProcessPoolExecutor",
    "RemoteError",
    "ResultPicklingError",
    "TaskMemoryError",
    "TaskTimeoutError",
    "UnpicklingFailedError",
    "UnsatisfiableResourcesError",
    "WorkerCrashedError",
    "as_completed",
    "current_executor",
    "reduce_as_completed",
]
