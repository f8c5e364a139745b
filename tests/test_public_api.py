"""The public surface is pinned: adding or removing a name is a decision, made here."""

import concurrent.futures
import inspect
from concurrent.futures.process import BrokenProcessPool

import futurepool

PUBLIC_NAMES = sorted(
    [
        "Executor",
        "ProcessPoolExecutor",
        "Future",
        "FuturePoolError",
        "WorkerCrashedError",
        "InitializerError",
        "UnpicklingFailedError",
        "RemoteError",
        "ResultPicklingError",
        "Pool",
        "ObjectStoreFullError",
        "ObjectLostError",
        "TaskTimeoutError",
        "OwnerDiedError",
        "TaskMemoryError",
        "UnsatisfiableResourcesError",
        "as_completed",
        "current_executor",
        "reduce_as_completed",
    ]
)


def test_all_is_pinned():
    assert sorted(futurepool.__all__) == PUBLIC_NAMES
    assert len(set(futurepool.__all__)) == len(futurepool.__all__), "duplicates in __all__"


def test_every_public_name_exists():
    missing = [name for name in futurepool.__all__ if not hasattr(futurepool, name)]
    assert missing == []


def test_version_is_a_string():
    assert isinstance(futurepool.__version__, str)


def test_process_pool_executor_is_an_alias_of_executor():
    assert futurepool.ProcessPoolExecutor is futurepool.Executor


def test_future_is_a_stdlib_future():
    assert issubclass(futurepool.Future, concurrent.futures.Future)


def test_worker_crash_is_a_broken_process_pool():
    assert issubclass(futurepool.WorkerCrashedError, BrokenProcessPool)


def test_as_completed_is_the_stdlib_one_plus_progress():
    ours = str(inspect.signature(futurepool.as_completed))
    assert ours == str(inspect.signature(concurrent.futures.as_completed))[:-1] + \
        ", *, progress=None)"


def test_errors_share_one_root():
    errors = [getattr(futurepool, name) for name in PUBLIC_NAMES if name.endswith("Error")]
    assert all(issubclass(error, futurepool.FuturePoolError) for error in errors)


def test_task_timeout_is_a_builtin_timeout():
    assert issubclass(futurepool.TaskTimeoutError, TimeoutError)


def test_task_memory_error_is_a_builtin_memory_error():
    assert issubclass(futurepool.TaskMemoryError, MemoryError)


def test_unsatisfiable_resources_is_a_value_error():
    assert issubclass(futurepool.UnsatisfiableResourcesError, ValueError)
