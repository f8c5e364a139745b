"""The rules of lineage reconstruction that need no cluster (``core.lineage``).

The behaviour across real hosts is in ``tests/cluster/test_lineage.py``.
"""

from __future__ import annotations

import pickle
import types

import pytest

import futurepool
from futurepool import config
from futurepool.core.lineage import Reconstruction
from futurepool.errors import ObjectLostError
from futurepool.future import Future
from futurepool.store import serialize
from futurepool.store.objects import Rebuilt
from futurepool.store.segments import Location

LOST = Location("fp_s1-abc-4294967296-0", 5_000_000, False, 1 << 32)


def lost_piece(location=LOST):
    return types.SimpleNamespace(location=location)


def first_error(location=LOST) -> ObjectLostError:
    return ObjectLostError(f"The stored value {location.name} is lost.", location.name, "node 0")


@pytest.mark.parametrize("limit, says", [(3, "a put value"), (0, "Reconstruction is off")])
def test_a_piece_no_task_made_is_not_rebuilt(monkeypatch, limit, says):
    """A put value (or anything without lineage) found lost: ObjectLostError naming it
    and the lost node; nothing is run."""
    monkeypatch.setattr(config, "MAX_RECONSTRUCTIONS", limit)
    lineage = Reconstruction(owner=None)
    with pytest.raises(ObjectLostError, match=says) as info:
        lineage.lost(lost_piece(), first_error(), "node 0 (host, 10.0.0.2)")
    assert info.value.name == LOST.name and info.value.host == "node 0 (host, 10.0.0.2)"
    assert LOST.name in str(info.value) and lineage.rebuilt == 0


def test_object_lost_error_pickles_with_its_host():
    error = ObjectLostError("gone", "fp_x", "node 3")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.name, copy.host) == ("gone", "fp_x", "node 3")
    assert isinstance(Rebuilt("r", "fp_x"), ObjectLostError)


@pytest.mark.parametrize("value, error", [(-1, ValueError), ("3", TypeError), (True, TypeError),
                                          (1.0, TypeError)])
def test_max_reconstructions_is_checked(value, error):
    with pytest.raises(error, match="max_reconstructions"):
        futurepool.Executor(1, max_reconstructions=value)


def test_max_reconstructions_reaches_the_owner(monkeypatch):
    with futurepool.Executor(1, max_reconstructions=0) as executor:
        assert executor._owner.objects.lineage.limit == 0
    monkeypatch.setattr(config, "MAX_RECONSTRUCTIONS", 5)
    with futurepool.Executor(1) as executor:
        assert executor._owner.objects.lineage.limit == 5  # read at use time


def test_result_decodes_the_rebuilt_pieces(monkeypatch):
    """A result() reading pieces that were lost and rebuilt meanwhile decodes again,
    from the future's new payload (the future object stays the same)."""
    future = Future()
    future._set_encoded_result(serialize.dumps("old"))
    calls = []
    real = serialize.decode

    def decode(data, view):
        calls.append(data)
        if len(calls) == 1:  # the fetch found the piece lost; it was rebuilt meanwhile
            future._replace_encoded(serialize.dumps("rebuilt"))
            raise Rebuilt("rebuilt", "fp_x")
        return real(data, view)

    monkeypatch.setattr(serialize, "decode", decode)
    assert future.result(timeout=1) == "rebuilt"
    assert len(calls) == 2 and future._encoded == serialize.dumps("rebuilt")
