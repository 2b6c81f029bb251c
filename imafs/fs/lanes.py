"""Where the overlay's slow work runs: worker threads, in lanes, shared fairly.

Everything that must not run on the event loop (a read from disk, a write, fsync, a
directory listing, and the integrity work the engine hands over as a ``Pending``)
runs in a worker thread. One caller must not be able to take them all: ten big
files opened by one unprivileged user once held every thread for minutes, and
root's open of a small file waited a minute (issue 14). So:

- **the common lane**: ``threads`` threads for everything, integrity work that hashes
  little included (the open of a file up to ``small_cost`` bytes, a verified read, a
  release) -- but no owner (uid, integrity namespace) may hold more than half of them
  for its integrity work: the others always find a thread;
- **the hashing lane**: a ``Pending`` that may hash more than ``small_cost`` bytes (its
  ``cost``, set by the engine) runs here: at most ``big`` at once, never on the
  common lane's threads, and at most one per owner; owners waiting for a slot get
  it in turn (trio's limiters are first come, first served, and an owner waits
  with one pass at a time).

The slow part of a release (the last writer's close: the file hashed again and
relabelled) runs on threads of its own (``Overlay.release_limiter``): opens of the
file wait for it in the lanes, so it must never wait for a lane's thread itself.

An owner's passes queue behind each other, not in front of anybody else's. A pass
whose opener has gone is abandoned by the engine (``FileRef.opener``), which frees
its slot.
"""
from __future__ import annotations

import trio

SMALL_COST = 8 << 20    # bytes: up to this, an open hashes in the common lane (~10 ms)


class _Owner:
    __slots__ = ("common", "hashing", "users")

    def __init__(self, common: int):
        self.common = trio.CapacityLimiter(common)
        self.hashing = trio.CapacityLimiter(1)
        self.users = 0


class Lanes:
    def __init__(self, threads: int = 8, big: int = 2, small_cost: int = SMALL_COST):
        self.common = trio.CapacityLimiter(threads)
        self.hashing = trio.CapacityLimiter(big)
        self.small_cost = small_cost
        self._per_owner = max(1, threads // 2)
        self._owners: dict = {}

    async def run(self, fn, *args, cost: int = 0, owner=None):
        """``fn(*args)`` in a worker thread of the lane its ``cost`` (bytes it may
        hash) and ``owner`` ((uid, namespace id), or None: the mount's own work) call
        for."""
        if owner is None:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.common)
        o = self._owners.get(owner)
        if o is None:
            o = self._owners[owner] = _Owner(self._per_owner)
        o.users += 1
        try:
            if cost <= self.small_cost:
                async with o.common:
                    return await trio.to_thread.run_sync(fn, *args, limiter=self.common)
            async with o.hashing:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.hashing)
        finally:
            o.users -= 1
            if o.users == 0:
                del self._owners[owner]

    def busy(self) -> dict:
        """Threads in use per lane (for the stats)."""
        return {"common": self.common.borrowed_tokens, "hashing": self.hashing.borrowed_tokens,
                "owners": len(self._owners)}
