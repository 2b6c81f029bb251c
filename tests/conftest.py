"""Shared fixtures and the session's checks (the helpers: tests/helpers/; the layout:
docs/development.md).

Tests sit by level: tests/unit/ (no mount), tests/mount/, tests/interop/ (real
external tools), tests/stress/; each test gets its level as a marker (``-m unit``),
the levels run in that order, and a test under tests/unit/ that asks for a mount is
refused at collection.

Every temporary directory the session makes (``tempfile``'s, ``world_tmp``) is inside
one directory, /tmp/imafs-XXXXXXXX; pytest's ``tmp_path`` stays in pytest's own
directory of the session. Mount tests mount real FUSE file systems there and always
unmount them, even when the test fails; at the end the session fails when a FUSE
mount is left under either, listing it (and unmounting it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from helpers.mounts import (IMAFS, Mount, REPO, ROOTFS_CACHE, force_unmount, is_mounted,
                            mounts_under)


# no per-example deadline: the suite runs two workers beside mounted daemons on two
# CPUs, where one descheduled example would be reported as DeadlineExceeded or Flaky
settings.register_profile("imafs", deadline=None)
settings.load_profile("imafs")

TESTS = Path(__file__).resolve().parent
LEVELS = ("unit", "mount", "interop", "stress")      # the directories, fastest first
MOUNT_FIXTURES = {"make_mount", "plain_mount"}
_session_tmp: Path | None = None
_basetemp: Path | None = None


@pytest.hookimpl(trylast=True)          # after pytest's own, which makes tmp_path_factory
def pytest_configure(config):
    """One directory for every temporary directory the session makes (``tempfile``'s,
    ``world_tmp``); pytest's ``tmp_path`` stays in pytest's own directory of the session
    (a socket path under it, gpg-agent's, is near the 108-byte limit)."""
    global _session_tmp, _basetemp
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        _basetemp = factory.getbasetemp()
    _session_tmp = Path(tempfile.mkdtemp(prefix="imafs-", dir="/tmp"))
    os.chmod(_session_tmp, 0o755)       # unprivileged test users traverse it
    tempfile.tempdir = str(_session_tmp)


def _level(item) -> str | None:
    try:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else ""


def pytest_collection_modifyitems(config, items):
    """Each test gets its level as a marker (``-m unit``) and runs in level order (unit
    first); a test outside the level directories, or a unit test that asks for a
    mount, stops the session."""
    for item in items:
        level = _level(item)
        if level is None:
            continue
        if level not in LEVELS:
            raise pytest.UsageError(f"{item.nodeid}: tests sit by level in tests/unit/, "
                                    f"tests/mount/, tests/interop/ or tests/stress/ "
                                    f"(docs/development.md)")
        item.add_marker(level)
        if level == "unit" and MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid}: a unit test mounts nothing; "
                                    f"tests that mount go under tests/mount/")
    order = {lv: i for i, lv in enumerate(LEVELS)}
    items.sort(key=lambda it: order.get(_level(it), len(LEVELS)))


def pytest_sessionfinish(session, exitstatus):
    """A FUSE mount left under the session's directories fails the session: listed,
    then unmounted (as gocryptfs's test runner does)."""
    if _session_tmp is None:
        return
    left = mounts_under(_session_tmp, fuse_only=True)
    if _basetemp is not None:
        left += mounts_under(_basetemp, fuse_only=True)
    for mnt in left:
        force_unmount(mnt)
    if left:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (f"{len(left)} FUSE mount(s) left behind by the tests (now unmounted):\n"
               + "".join(f"  {m}\n" for m in left))
        if tr is not None:
            tr.write_sep("=", "mounts left behind", red=True)
            tr.write(msg)
        else:
            print(msg)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif exitstatus == pytest.ExitCode.OK and not mounts_under(_session_tmp):
        shutil.rmtree(_session_tmp, ignore_errors=True)     # kept when a test failed


@pytest.fixture
def world_tmp():
    """A temporary directory that unprivileged test users can traverse (pytest's
    tmp_path lives under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="w"))      # in the session's directory
    os.chmod(d, 0o755)
    yield d
    for sub in d.iterdir():
        if is_mounted(str(sub)):
            force_unmount(str(sub))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mkfile(tmp_path):
    """Factory: mkfile(data) -> the path of a new file in tmp_path holding data."""
    n = [0]

    def make(data: bytes) -> Path:
        n[0] += 1
        p = tmp_path / f"f{n[0]}"
        p.write_bytes(data)
        return p
    return make


@pytest.fixture
def make_mount(world_tmp):
    """Factory: make_mount(args=[...], backing=None) -> started Mount; all are
    unmounted at teardown."""
    tmp_path = world_tmp
    mounts: list[Mount] = []
    n = [0]

    def factory(args=None, backing: Path | None = None, start: bool = True) -> Mount:
        n[0] += 1
        b = backing or tmp_path / f"backing{n[0]}"
        b.mkdir(exist_ok=True)
        m = tmp_path / f"mnt{n[0]}"
        m.mkdir()
        s = tmp_path / f"state{n[0]}"
        mt = Mount(b, m, s, list(args or []))
        mounts.append(mt)
        return mt.start() if start else mt

    yield factory
    for mt in mounts:
        mt.stop()
    # a daemon that failed leaves its log: show it for the failing test
    for mt in mounts:
        assert not is_mounted(str(mt.mnt)), f"{mt.mnt} still mounted"


@pytest.fixture
def plain_mount(make_mount):
    """A passthrough mount with integrity off."""
    return make_mount(["--no-integrity"])


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """The suite's Debian rootfs (scripts/rootfs.sh's cache), shared by the session:
    read it, never change it (overlay or copy it). Skipped when it is not built, unless
    IMAFS_BUILD_ROOTFS=1 (then it is built here)."""
    if not (Path(str(ROOTFS_CACHE) + ".complete").is_file() and ROOTFS_CACHE.is_dir()):
        if os.environ.get("IMAFS_BUILD_ROOTFS", "") in ("", "0"):
            pytest.skip(f"no cached Debian rootfs at {ROOTFS_CACHE} (build it with "
                        f"scripts/rootfs.sh, or set IMAFS_BUILD_ROOTFS=1)")
        p = subprocess.run([str(REPO / "scripts" / "rootfs.sh"), str(ROOTFS_CACHE)],
                           capture_output=True, text=True, timeout=840)
        assert p.returncode == 0, p.stderr
    return ROOTFS_CACHE


@pytest.fixture(scope="session")
def debian_digest_list(debian_rootfs, tmp_path_factory):
    """``imafs digest-list from-dpkg`` of the suite's rootfs, from the .debs and
    archive index files scripts/rootfs.sh keeps beside it (ROOTFS.archive), built once
    per session and signed (security.ima) with a test key: an object with ``list``,
    ``keys`` (the key directory: signing_key.pem, signing_cert.der) and ``unsigned``
    (the same list, no signature)."""
    archive = Path(str(debian_rootfs) + ".archive")
    if not archive.is_dir():
        pytest.skip(f"no {archive} (scripts/rootfs.sh keeps the .debs there)")
    d = tmp_path_factory.mktemp("debian-list")
    out = d / "debian.list"
    p = subprocess.run(IMAFS + ["digest-list", "from-dpkg", str(debian_rootfs), "--debs",
                                str(archive), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    keys = d / "keys"
    subprocess.run(IMAFS + ["keygen", "--out", str(keys), "--type", "ec"], check=True,
                   capture_output=True, cwd=REPO)
    unsigned = d / "unsigned.list"
    shutil.copyfile(out, unsigned)
    subprocess.run(IMAFS + ["sign", "-q", "--key", str(keys / "signing_key.pem"),
                            "--cert", str(keys / "signing_cert.der"), str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return type("DebianList", (), {"list": out, "keys": keys, "unsigned": unsigned})

