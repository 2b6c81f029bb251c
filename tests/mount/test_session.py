"""The test session's own check (tests/conftest.py): a session that leaves a FUSE
mount under its temporary directory fails, naming the mount, and the mount is gone
afterwards; a session that unmounts everything passes and leaves no directory."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.mounts import REPO, is_mounted

INNER = '''
import tempfile
from pathlib import Path

from helpers.mounts import Mount


def test_mounts(request):
    d = Path(tempfile.mkdtemp(prefix="inner-"))
    (d / "b").mkdir()
    (d / "m").mkdir()
    m = Mount(d / "b", d / "m", d / "s", ["--no-integrity"]).start()
    print("MOUNTED", m.mnt)
    if {stop}:
        m.stop()
'''


def inner_session(tmp_path, stop: bool):
    t = tmp_path / f"inner_{stop}"
    t.mkdir()
    (t / "test_inner.py").write_text(INNER.format(stop=stop))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p",
                        "no:cacheprovider", "-s", "-q", "--rootdir", str(t), str(t)],
                       capture_output=True, text=True, timeout=120, cwd=t, env=env)
    mnt = re.search(r"MOUNTED (\S+)", r.stdout)
    assert mnt, r.stdout + r.stderr
    return r, mnt.group(1)


def test_a_mount_left_behind_fails_the_session_and_is_unmounted(tmp_path):
    r, mnt = inner_session(tmp_path, stop=False)
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout + r.stderr
    assert "1 passed" in r.stdout                      # the test itself passed
    assert "FUSE mount(s) left behind" in r.stdout and f"  {mnt}\n" in r.stdout
    assert not is_mounted(mnt)
    assert os.path.isdir(os.path.dirname(os.path.dirname(mnt)))   # kept for a look


def test_a_clean_session_passes_and_removes_its_directory(tmp_path):
    r, mnt = inner_session(tmp_path, stop=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left behind" not in r.stdout
    assert not os.path.exists(os.path.dirname(os.path.dirname(mnt)))
