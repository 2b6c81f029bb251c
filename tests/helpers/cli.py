"""Running imafs's commands in process, as the command tests do (not a test module):
``run`` and the fixtures ``keydir`` (a key and certificate ``imafs keygen`` made, one
per test module) and ``files`` (two plain files). A test module imports the fixtures
it uses by name."""
from __future__ import annotations

import pytest

from imafs.cli import main


def run(capsys, *argv):
    """``imafs ARGV`` in process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(d), "--cn", "unit test"]) == 0
    return d


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a").write_bytes(b"alpha\n")
    (tmp_path / "b").write_bytes(b"beta\n" * 1000)
    return tmp_path
