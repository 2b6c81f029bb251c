"""Permission checks through the mount: the kernel checks them (default_permissions)
on the attributes and ACLs the daemon serves, except where FUSE leaves a decision to
the daemon (CREATE of a name that exists after all). Every check runs the same calls
as the same user on a plain directory (the kernel's answer) and through the mount.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from helpers.fsworker import TwoRoots, Worker

pytestmark = pytest.mark.mount

U, G = 4001, 4001          # an unprivileged user
W, WG = 4002, 4002         # another one
SUPP = 4100                # a supplementary group of U


def _env(make_mount, world_tmp, args):
    return TwoRoots.make(make_mount, world_tmp, args, mode=0o1777, in_backing=True)


# a long entry timeout: the negative dentry of a lookup stays cached, so the kernel
# sends CREATE (not OPEN) for an O_CREAT open of a name created behind the mount
@pytest.fixture(params=["plain", "integrity"])
def env(request, make_mount, world_tmp):
    if request.param == "plain":
        return _env(make_mount, world_tmp, ["--no-integrity", "--attr-timeout", "30"])
    pol = world_tmp / "measure-all.policy"
    pol.write_text("measure func=FILE_CHECK\n")
    return _env(make_mount, world_tmp, ["--policy", str(pol), "--attr-timeout", "30"])


@pytest.fixture
def plain(make_mount, world_tmp):
    return _env(make_mount, world_tmp, ["--no-integrity"])


@pytest.fixture
def user_w():
    with Worker(U, G, [G, SUPP]) as w:
        yield w


@pytest.fixture
def other_w():
    with Worker(W, WG, [WG]) as w:
        yield w


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package acl; scripts/test installs it)")


def setfacl(*args) -> None:
    _need("setfacl")
    subprocess.run(["setfacl", *map(str, args)], check=True, capture_output=True)


def getfacl(path) -> str:
    _need("getfacl")
    p = subprocess.run(["getfacl", "-cp", str(path)], check=True, capture_output=True,
                       text=True)
    return p.stdout


# --------------------------------------------------------------------------- CREATE
_NEGATIVE = "r = os.path.exists(root + '/' + name)"   # caches the negative dentry

_OPEN = """
try:
    fd = os.open(root + '/' + name, flags, 0o666)
except OSError as e:
    r = ('err', errno.errorcode[e.errno])
else:
    try:
        data = os.pread(fd, 100, 0) if flags & os.O_ACCMODE != os.O_WRONLY else None
        if flags & os.O_ACCMODE != os.O_RDONLY:
            os.write(fd, b'overwritten')
    finally:
        os.close(fd)
    r = ('ok', data)
"""


def _behind(env, name: str, mode: int, uid=0, gid=0, content=b"root secret\n", acl=None):
    def prep(d: Path):
        p = d / name
        p.write_bytes(content)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        if acl:
            setfacl("-m", acl, p)
    env.setup(prep)


CREATE_CASES = [
    # (name, mode, owner uid, owner gid, acl, flags, expected for U)
    ("rdwr", 0o600, 0, 0, None, os.O_CREAT | os.O_RDWR, ("err", "EACCES")),
    ("rdonly", 0o600, 0, 0, None, os.O_CREAT | os.O_RDONLY, ("err", "EACCES")),
    ("wronly_trunc", 0o644, 0, 0, None, os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
     ("err", "EACCES")),
    ("rdonly_trunc", 0o644, 0, 0, None, os.O_CREAT | os.O_RDONLY | os.O_TRUNC,
     ("err", "EACCES")),
    ("append", 0o644, 0, 0, None, os.O_CREAT | os.O_WRONLY | os.O_APPEND, ("err", "EACCES")),
    ("noatime", 0o644, 0, 0, None, os.O_CREAT | os.O_RDONLY | os.O_NOATIME, ("err", "EPERM")),
    ("readable", 0o644, 0, 0, None, os.O_CREAT | os.O_RDONLY, ("ok", b"root secret\n")),
    ("own", 0o600, U, G, None, os.O_CREAT | os.O_RDWR, ("ok", b"root secret\n")),
    ("own_trunc", 0o600, U, G, None, os.O_CREAT | os.O_RDWR | os.O_TRUNC, ("ok", b"")),
    # supplementary groups and ACLs count, as natively
    ("supp_group", 0o060, 0, SUPP, None, os.O_CREAT | os.O_RDWR, ("ok", b"root secret\n")),
    ("acl_grant", 0o600, 0, 0, f"u:{U}:rw", os.O_CREAT | os.O_RDWR, ("ok", b"root secret\n")),
    ("acl_deny", 0o666, 0, 0, f"u:{U}:---", os.O_CREAT | os.O_RDWR, ("err", "EACCES")),
]


@pytest.mark.parametrize("case", CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_create_of_a_name_that_exists_is_checked(env, user_w, case):
    """O_CREAT of a name the kernel has cached as missing reaches the daemon as CREATE;
    the file was created behind the mount meanwhile. FUSE has no way to answer
    "existed": the kernel takes the file as created by the caller and checks
    nothing, so the daemon must (it opened it as root: the audit's bypass)."""
    name, mode, uid, gid, acl, flags, want = case
    for root in env.roots:
        assert user_w(_NEGATIVE, root=str(root), name=name) is False
    _behind(env, name, mode, uid, gid, acl=acl)
    got = env.twice(user_w, _OPEN, name=name, flags=flags)
    assert tuple(got) == want
    if want[0] == "err":
        assert (env.backing / name).read_bytes() == b"root secret\n"   # untouched
        assert stat.S_IMODE(os.stat(env.backing / name).st_mode) == mode


def test_create_of_an_existing_name_by_root(env):
    """Root (CAP_DAC_OVERRIDE) opens anything; the daemon needs no id switch."""
    m, b = env.mnt, env.backing
    with Worker(0, 0) as root_w:
        assert root_w(_NEGATIVE, root=str(m), name="r") is False
        _behind(env, "r", 0o000)
        assert tuple(env.twice(root_w, _OPEN, name="r", flags=os.O_CREAT | os.O_RDWR)) == \
            ("ok", b"root secret\n")
    assert (b / "r").read_bytes() == b"overwritten\n"


def test_create_fallback_leaves_daemon_threads_as_root(env, user_w):
    """After many refused CREATE fallbacks (each one switching a worker thread's ids
    and back), the daemon still acts as root: files created later belong to their
    creators, root-only files stay readable by root through the mount."""
    for i in range(20):
        n = f"x{i}"
        assert user_w(_NEGATIVE, root=str(env.mnt), name=n) is False
        (env.backing / n).write_text("s")
        os.chmod(env.backing / n, 0o600)
        assert user_w(_OPEN, root=str(env.mnt), name=n, flags=os.O_CREAT | os.O_RDWR) \
            == ["err", "EACCES"]
    (env.backing / "rootonly").write_text("root")
    os.chmod(env.backing / "rootonly", 0o600)
    assert (env.mnt / "rootonly").read_text() == "root"
    user_w("os.close(os.open(root + '/mine', os.O_CREAT | os.O_WRONLY, 0o600))",
           root=str(env.mnt))
    st = os.stat(env.backing / "mine")
    assert (st.st_uid, st.st_gid) == (U, G)
    pid = int(Path(env.m.state / "daemon.lock").read_text())

    def ids(task):
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        return {line.split(":")[0]: line.split()[1:] for line in status.splitlines()
                if line.startswith(("Uid:", "Gid:", "Groups:"))}
    main = ids(pid)
    assert main["Uid"] == ["0"] * 4 and main["Gid"] == ["0"] * 4   # real, eff, saved, fs
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) > 1                   # the worker threads that did the opens
    for task in tasks:
        assert ids(task) == main, task


# --------------------------------------------------------------------------- ACLs
def test_acl_denies(plain, user_w, other_w):
    """A named-user entry with no permissions denies that user a 0644 file."""
    def prep(d: Path):
        (d / "f").write_text("data\n")
        os.chmod(d / "f", 0o644)
        setfacl("-m", f"u:{U}:---", d / "f")
    plain.setup(prep)
    read = "r = open(root + '/f').read()"
    assert plain.twice(user_w, read) == "EACCES"
    assert plain.twice(other_w, read) == "data\n"
    assert plain.twice(user_w, "r = os.access(root + '/f', os.R_OK)") is False


def test_acl_grants(plain, user_w, other_w):
    """A user who is not the owner gets access through a named-user entry, a member
    of a named group through a named-group entry; others do not."""
    def prep(d: Path):
        (d / "f").write_text("data\n")
        os.chmod(d / "f", 0o600)
        setfacl("-m", f"u:{U}:r", d / "f")
        (d / "g").write_text("group\n")
        os.chmod(d / "g", 0o600)
        setfacl("-m", f"g:{SUPP}:rw", d / "g")
        (d / "dir").mkdir()
        (d / "dir" / "inside").write_text("in\n")
        os.chmod(d / "dir" / "inside", 0o644)
        os.chmod(d / "dir", 0o700)
        setfacl("-m", f"u:{U}:rx", d / "dir")
    plain.setup(prep)
    assert plain.twice(user_w, "r = open(root + '/f').read()") == "data\n"
    assert plain.twice(other_w, "r = open(root + '/f').read()") == "EACCES"
    assert plain.twice(user_w, "fd = os.open(root + '/f', os.O_WRONLY); r = 1") == "EACCES"
    code = "open(root + '/g', 'a').write('more\\n'); r = open(root + '/g').read()"
    assert plain.twice(user_w, code) == "group\nmore\n"
    assert plain.twice(other_w, code) == "EACCES"
    code = "r = [sorted(os.listdir(root + '/dir')), open(root + '/dir/inside').read()]"
    assert plain.twice(user_w, code) == [["inside"], "in\n"]
    assert plain.twice(other_w, code) == "EACCES"
    for d in plain.dirs[1:]:
        assert getfacl(plain.mnt / "f") == getfacl(d / "f")


def test_acl_mask_and_mode_stay_consistent(plain, user_w):
    """The mask limits named entries; chmod of the group bits is the mask (and the
    kernel's cached ACL follows at once); setfacl of the mask changes the mode."""
    def prep(d: Path):
        (d / "f").write_text("data\n")
        os.chmod(d / "f", 0o600)
        setfacl("-m", f"u:{U}:rw,m::r", d / "f")
    plain.setup(prep)
    m = plain.mnt
    read = "r = open(root + '/f').read()"
    write = "fd = os.open(root + '/f', os.O_WRONLY | os.O_APPEND); os.write(fd, b'w'); os.close(fd); r = 1"
    mode = "r = oct(os.stat(root + '/f').st_mode)"
    assert plain.twice(user_w, read) == "data\n"
    assert plain.twice(user_w, write) == "EACCES"          # the mask says r
    assert plain.twice(user_w, mode) == oct(0o100640)
    for r in plain.roots:                                   # through the mount for m
        os.chmod(r / "f", 0o600)                            # mask ---
    assert plain.twice(user_w, read) == "EACCES"
    assert plain.twice(user_w, "r = os.access(root + '/f', os.R_OK)") is False
    for r in plain.roots:
        setfacl("-m", "m::rw", r / "f")                     # mask rw: mode 0660
    assert plain.twice(user_w, mode) == oct(0o100660)
    assert plain.twice(user_w, write) == 1
    assert getfacl(m / "f") == getfacl(plain.native / "f")
    for r in plain.roots:
        setfacl("-b", r / "f")                              # no ACL: the mode decides
    assert plain.twice(user_w, read) == "EACCES"
    assert plain.twice(user_w, mode) == oct(0o100600)


def test_acl_set_by_owner_not_by_others(plain, user_w, other_w):
    """Only the owner (or root) sets an ACL; the owner, not a member of the file's
    group, loses S_ISGID doing so (posix_acl_update_mode)."""
    def prep(d: Path):
        for n, mode, gid in (("mine", 0o644, G), ("sgid", 0o2775, 0), ("sgid_mine", 0o2775, SUPP)):
            (d / n).write_text("x")
            os.chown(d / n, U, gid)
            os.chmod(d / n, mode)
        (d / "sgdir").mkdir()
        os.chown(d / "sgdir", U, 0)
        os.chmod(d / "sgdir", 0o2775)
    plain.setup(prep)
    code = """
import subprocess
out = []
for n in ('mine', 'sgid', 'sgid_mine', 'sgdir'):
    p = subprocess.run(['setfacl', '-m', 'u:4002:r', root + '/' + n], capture_output=True)
    out.append((n, p.returncode, oct(os.stat(root + '/' + n).st_mode)))
r = out
"""
    _need("setfacl")
    r = plain.twice(user_w, code)
    assert r[1] == ["sgid", 0, oct(0o100775)]            # S_ISGID dropped
    assert r[2] == ["sgid_mine", 0, oct(0o102775)]       # a member keeps it
    assert r[3] == ["sgdir", 0, oct(0o040775)]
    code = """
import subprocess
p = subprocess.run(['setfacl', '-m', 'u:4002:rw', root + '/mine'], capture_output=True)
r = p.returncode
"""
    assert plain.twice(other_w, code) == 1               # EPERM: not the owner
    assert "user:4002:r--" in getfacl(plain.mnt / "mine")


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_default_acl_inherited_on_create(plain, user_w, umask):
    """A directory's default ACL becomes the access ACL (and, for directories, the
    default ACL) of what is created in it, its mask limited by the mode asked for.
    (With a default ACL the kernel ignores the umask; through the mount the kernel
    has applied it to the mode before the request -- pyfuse3 cannot negotiate
    FUSE_DONT_MASK -- so only umasks that clear nothing the ACL grants agree.)"""
    def prep(d: Path):
        (d / "dd").mkdir()
        os.chmod(d / "dd", 0o777)
        setfacl("-d", "-m", f"u:{U}:rwx,u:{W}:r,g::rwx,g:{SUPP}:rx,o::---,m::rwx", d / "dd")
    plain.setup(prep)
    code = f"""
os.umask({umask})
d = root + '/dd'
os.close(os.open(d + '/f', os.O_CREAT | os.O_WRONLY, 0o640))
os.mkdir(d + '/sub', 0o750)
os.mknod(d + '/node', 0o600 | stat.S_IFREG)
fd = os.open(d + '/sub/deeper', os.O_CREAT | os.O_WRONLY, 0o666); os.close(fd)
r = [oct(os.stat(d + '/' + n).st_mode) for n in ('f', 'sub', 'node', 'sub/deeper')]
"""
    if umask == 0o077:
        # what the kernel does natively (the umask is ignored): modes from the request
        # and the default ACL; through the mount the umask applied first
        res = [user_w.call(code, root=str(r)) for r in plain.roots]
        assert res[0][1] == [oct(0o100640), oct(0o040750), oct(0o100600), oct(0o100660)]
        assert res[1][1] == [oct(0o100600), oct(0o040700), oct(0o100600), oct(0o100600)]
        return
    r = plain.twice(user_w, code)
    assert r == [oct(0o100640), oct(0o040750), oct(0o100600), oct(0o100660)]
    for n in ("dd/f", "dd/sub", "dd/node", "dd/sub/deeper"):
        assert getfacl(plain.mnt / n) == getfacl(plain.native / n), n
    assert f"default:user:{U}:rwx" in getfacl(plain.mnt / "dd/sub")
    # and it is enforced: W may read f (u:W:r), SUPP members read and exec
    with Worker(W, WG, [WG]) as w:
        assert plain.twice(w, "r = open(root + '/dd/f').read()") == ""
        assert plain.twice(w, "fd = os.open(root + '/dd/f', os.O_WRONLY); r = 1") == "EACCES"


def test_backing_without_acl_support(world_tmp, make_mount, user_w):
    """A backing file system without ACLs (ramfs: no xattrs at all): no file has an
    ACL, so the mode decides -- the kernel would refuse every group-class check if
    the daemon answered the ACL lookup with EOPNOTSUPP."""
    mount = make_mount(["--no-integrity"], start=False)
    subprocess.run(["mount", "-t", "ramfs", "none", str(mount.backing)], check=True)
    try:
        os.chmod(mount.backing, 0o777)
        (mount.backing / "f").write_text("data\n")
        os.chmod(mount.backing / "f", 0o664)
        (mount.backing / "d").mkdir()
        os.chmod(mount.backing / "d", 0o775)
        mount.start()
        assert user_w("r = open(root + '/f').read()", root=str(mount.mnt)) == "data\n"
        assert user_w("r = os.listdir(root + '/d')", root=str(mount.mnt)) == []
        assert user_w.call("open(root + '/f', 'a')", root=str(mount.mnt)) == ("err", "EACCES")
        p = subprocess.run(["setfacl", "-m", f"u:{U}:rw", str(mount.mnt / "f")],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "not supported" in p.stderr
    finally:
        mount.stop()
        subprocess.run(["umount", str(mount.backing)], check=True)
