"""hash_fd's ``progress``: called per chunk with the bytes read, and a true answer
abandons the pass (HashAbandoned), inline and with helper threads alike."""
from __future__ import annotations

import os

import pytest

from imafs.ima import hashing
from imafs.ima.verity import VeritySpec


@pytest.mark.parametrize("size", [1000, 5 << 20])
@pytest.mark.parametrize("verity", [None, VeritySpec()])
def test_progress_counts_and_abandons(tmp_path, size, verity):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    fd = os.open(p, os.O_RDONLY)
    try:
        seen = []
        res = hashing.hash_fd(fd, ["sha256"], verity=verity,
                              progress=lambda n: seen.append(n) and False)
        assert sum(seen) == size == res.size
        calls = []

        def stop(n):
            calls.append(n)
            return len(calls) == 2 or size < (1 << 20)
        with pytest.raises(hashing.HashAbandoned):
            hashing.hash_fd(fd, ["sha256", "sha512"], verity=verity, progress=stop)
        assert len(calls) == (1 if size < (1 << 20) else 2)
    finally:
        os.close(fd)
