"""The head's side of the stdlib's shared memory across hosts (``store.shared``).

A task that ran on another host with mirrors of the driver's segments sends,
with its outcome, what it changed in them (patches: an encoded value, stored
on its host when large). Before the task's future completes, the head pulls
the stored patches into its own store (``ObjectDirectory.deliver``), writes
them into the segments, and only then settles the outcome::

    RESULTS (+ patches) ──► stored pieces pulled here ──► store.shared.write_back
                                                          ──► settle(): the future completes
    a piece that cannot be pulled (its host was lost) ──► the future fails, saying so

Runs on the owner's I/O thread, as the deliveries' callbacks do.
"""

from __future__ import annotations

import logging

from ..errors import ObjectLostError
from ..store import segments, serialize, shared
from .directory import HEAD

LOGGER = logging.getLogger("futurepool")


def write_back(owner, task, patches, settle) -> None:
    """Write ``task``'s ``patches`` (its stored pieces as Blocks) into this host's
    segments, then call ``settle()``."""
    blocks = [] if type(patches) is bytes else \
        [p for p in (patches[0], *patches[1]) if type(p) is not bytes]
    arrived: dict[int, segments.Location] = {}

    def delivered(block, location, error) -> None:
        if not blocks:
            return  # one already failed
        if error is not None:
            blocks.clear()
            owner._settle_exception(task, ObjectLostError(
                f"The changes {task.describe()} made to shared memory on another host could"
                f" not be written back: {error}", block.location.name))
            return
        arrived[id(block)] = location
        if len(arrived) == len(blocks):
            apply()

    def apply() -> None:
        dirs = owner.store.settings.dirs
        try:
            shared.write_back(serialize.decode(
                patches, lambda piece: segments.read(arrived[id(piece)], dirs)), task.shared)
        except Exception:  # noqa: BLE001 - e.g. the segment was unlinked meanwhile
            LOGGER.warning("writing back what %s changed in shared memory", task.describe(),
                           exc_info=True)
        settle()

    if not blocks:
        apply()
    for block in list(blocks):
        owner.objects.deliver(block, HEAD, lambda loc, err, b=block: delivered(b, loc, err))


__all__ = ["write_back"]
