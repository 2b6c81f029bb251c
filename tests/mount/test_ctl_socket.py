"""The control socket through real mounts: STATE/control.sock, who may use it, its
protocol's bounds, and ``imafs ns create|list|remove`` binding real processes -- plus
ns-create inside the mount, which shares its grammar."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, wait_for
from imafs.ctl import protocol as P
from imafs.fs.daemon import RUN_DIR, _infofile, mount_record
from imafs.ima.templates import parse_ascii

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
POLICY = "measure func=FILE_CHECK mask=MAY_READ\nmeasure func=BPRM_CHECK\n"


def rootfs(b: Path) -> None:
    (b / "bin").mkdir()
    shutil.copy("/bin/busybox", b / "bin" / "busybox")
    for a in ("sh", "cat", "echo", "sleep", "true"):
        os.symlink("busybox", b / "bin" / a)
    for d in ("proc", "tmp", "etc"):
        (b / d).mkdir()
    (b / "etc" / "motd").write_text("hello\n")
    (b / "etc" / "other").write_text("other\n")


def imafs(*args, ok=True, user=None, **kw) -> subprocess.CompletedProcess:
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    r = subprocess.run(pre + IMAFS + [str(a) for a in args], capture_output=True, text=True,
                       timeout=60, cwd=REPO, **kw)
    if ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


@pytest.fixture
def m(make_mount, world_tmp):
    b = world_tmp / "backing1"
    b.mkdir()
    rootfs(b)
    (world_tmp / "host.policy").write_text("measure func=BPRM_CHECK\n")
    return make_mount(["--policy", str(world_tmp / "host.policy")], backing=b)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(IMAFS + ["keygen", "--out", str(d), "--type", "ec"], check=True,
                   capture_output=True, cwd=REPO)
    return d


def raw(m, *lines: bytes, fds=(), read=True) -> list[dict]:
    """Send raw request lines on one connection; the answers."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(m.state / "control.sock"))
    out, buf = [], b""
    with s:
        for i, line in enumerate(lines):
            try:
                if fds and i == 0:
                    socket.send_fds(s, [line], list(fds))
                else:
                    s.sendall(line)
            except BrokenPipeError:     # refused before the daemon read: its answer waits
                pass
            if not read:
                continue
            while b"\n" not in buf:
                chunk = s.recv(1 << 16)
                if not chunk:
                    return out
                buf += chunk
            ans, _, buf = buf.partition(b"\n")
            out.append(json.loads(ans))
    return out


def host_list(m) -> list:
    return list(parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes()))


class Reader:
    """A host process that reads, through the mount, each path written to it: bound
    to a namespace, what it reads lands in that namespace's list."""

    def __init__(self):
        self.p = subprocess.Popen(["bash", "-c", 'while read -r f; do cat "$f" >/dev/null; '
                                   'echo done; done'], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid

    def read(self, path) -> None:
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline() == "done\n"

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def test_socket_and_record(m):
    sock = m.state / "control.sock"
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    rec = mount_record(str(m.mnt))
    assert rec["socket"] == str(sock) and rec["state"] == str(m.state)
    assert os.lstat(_infofile(str(m.mnt))).st_mode & 0o022 == 0
    assert os.lstat(RUN_DIR).st_mode & 0o022 == 0
    ans = raw(m, b'{"v":1,"op":"hello"}\n')[0]
    assert ans["ok"] and ans["versions"] == [1] and ans["mountpoint"] == str(m.mnt)
    assert ans["dev"] == f"0:{os.minor(os.stat(m.mnt).st_dev)}"
    m.stop()
    assert not sock.exists() and mount_record(str(m.mnt)) is None


def test_only_the_hosts_root_may_use_it(m):
    """uid 65534 cannot connect (0600), and the CLI says why; root of a user namespace
    (0 mapped to 0, with CAP_DAC_OVERRIDE there) connects but is refused by the daemon
    for its user namespace."""
    r = imafs("ns", "list", m.mnt, ok=False, user=65534)
    assert r.returncode == 2 and "runs as uid 65534, not root" in r.stderr
    # a refused peer is told at once, before it sends anything
    code = (f"import socket; s = socket.socket(socket.AF_UNIX); "
            f"s.connect({str(m.state / 'control.sock')!r}); print(s.recv(4096).decode())")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "PermissionError" in r.stderr
    r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", code],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert not ans["ok"] and ans["errno"] == "EACCES"
    assert "uid 0 of another user namespace" in ans["error"]
    assert "connection refused" in m.log_text()


def test_bad_requests_are_refused_and_the_mount_goes_on(m):
    ans = raw(m, b"not json\n", b'{"v":2,"op":"hello"}\n', b'{"v":1,"op":"format"}\n',
              b'{"v":1,"op":"ns-create","name":"x"}\n', b'{"v":1,"op":"ns-create",'
              b'"name":"x","pid":"1"}\n', b'{"v":1,"op":"ns-list","fds":["pidfd"]}\n',
              b'{"v":1,"op":"hello"}\n')
    assert [a.get("errno") for a in ans] == ["EINVAL", "EPROTONOSUPPORT", P.errno_name(errno.EOPNOTSUPP),
                                            "EINVAL", "EINVAL", "EINVAL", None]
    assert "argument 'pid' missing" in ans[3]["error"]
    assert "names 1 descriptor(s) and carries 0" in ans[5]["error"] and ans[6]["ok"]
    # what the client would have refused, sent anyway: the daemon checks it again,
    # logs and audits the refusal
    ans = raw(m, b'{"v":1,"op":"ns-create","name":"q","pid":%d,"options":{"quota":"3"}}\n'
              % os.getpid())
    assert ans[0]["errno"] == "EINVAL" and "quota=: " in ans[0]["error"]
    rec = [a for a in m.audit() if a["type"] == "ns_create_rejected"][-1]
    assert rec["via"] == "control socket" and rec["name"] == "q" and "quota" in rec["error"]
    assert "control socket: ns-create by pid" in m.log_text()
    # more descriptors than a request may carry: refused, connection closed
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    try:
        ans = raw(m, b'{"v":1,"op":"hello"}\n', fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert ans[0]["errno"] == "EMSGSIZE" and "descriptors" in ans[0]["error"]
    # a request over the bound: refused without reading it all, connection closed
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(m.state / "control.sock"))
    s.settimeout(20)
    with s:
        try:
            s.sendall(b'{"v":1,"op":"hello","x":"' + b"a" * (P.MAX_REQUEST + (1 << 16)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = s.recv(4096)
    assert b"EMSGSIZE" in data
    assert (m.mnt / "etc" / "motd").read_text() == "hello\n"
    assert raw(m, b'{"v":1,"op":"hello"}\n')[0]["ok"]


def test_connections_are_bounded(m):
    held = []
    try:
        for _ in range(P.MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(m.state / "control.sock"))
            s.sendall(b'{"v":1,"op":"hello"}\n')
            s.settimeout(10)
            assert b'"ok":true' in s.recv(4096)
            held.append(s)
        ans = raw(m, b'{"v":1,"op":"hello"}\n')
        assert ans[0]["errno"] == "EAGAIN" and "at once" in ans[0]["error"]
        # the command line says why, whether the refusal came before or after its request
        r = imafs("ns", "list", m.mnt, ok=False)
        assert r.returncode != 0 and "at once: try again" in r.stderr, r.stderr
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: raw(m, b'{"v":1,"op":"hello"}\n')[0]["ok"], 10)


def test_ns_create_list_remove(m, keys, world_tmp):
    (world_tmp / "web.policy").write_text(POLICY)
    rd = Reader()
    try:
        r = imafs("ns", "create", m.mnt, "3f" * 32, "--pid", rd.pid, "--policy",
                  world_tmp / "web.policy", "--keys", keys, "appraise=log")
        assert f"namespace /{'3f' * 32} (id 1" in r.stdout and "2 rule(s), 1 key(s)" in r.stdout
        web = m.ctl(f"namespaces/{'3f' * 32}")
        rd.read(m.mnt / "etc" / "motd")
        names = [e.name for e in parse_ascii((web / "ascii_runtime_measurements").read_bytes())]
        assert names == [b"boot_aggregate", b"ns-init", b"/etc/motd"]      # its policy
        assert (web / "policy").read_text().split() == POLICY.split()  # as the kernel prints
        from imafs.ima.keys import keyid_of
        kid = f"{keyid_of((keys / 'signing_cert.der').read_bytes()):08x}"
        assert (web / "keys").read_text().startswith(kid)
        assert f":/ns1\n" in Path(f"/proc/{rd.pid}/cgroup").read_text()
        ls = imafs("ns", "list", m.mnt).stdout.splitlines()
        assert ls[0].split()[:5] == ["NAMESPACE", "ID", "PROCS", "ENTRIES", "ORIGIN"]
        assert ls[1].split()[:5] == [f"/{'3f' * 32}", "1", "1", "3", "host"]
        doc = json.loads(imafs("ns", "list", m.mnt, "--json").stdout)
        assert doc[0]["appraise"] == "log" and doc[0]["keys"] == [kid]
        # the host's record of it: origin, the policy's digest and its key
        create = [e for e in host_list(m) if e.name == b"ns-create"][-1].get("buf").decode()
        assert "origin=host policy=sha256:" in create and f"keys={kid}" in create
        r = imafs("ns", "remove", m.mnt, "3f" * 32, ok=False)
        assert r.returncode == 2 and "still has processes" in r.stderr
    finally:
        rd.stop()
    arch = world_tmp / "archive"
    r = imafs("ns", "remove", m.mnt, "3f" * 32, "--uuid", "no-such-uuid", ok=False)
    assert "is another one" in r.stderr
    r = imafs("ns", "remove", m.mnt, "3f" * 32, "--archive", arch)
    assert "removed: 3 entries" in r.stdout and f"archived in {arch}/{'3f' * 32}.1" in r.stdout
    assert imafs("ns", "list", m.mnt).stdout.count("\n") == 1
    a = arch / f"{'3f' * 32}.1"
    r = subprocess.run(["evmctl", "ima_measurement", "--pcrs", f"sha1,{a}/pcrs/sha1",
                        "--pcrs", f"sha256,{a}/pcrs/sha256", str(a / "binary_runtime_measurements")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    host_bin = world_tmp / "host.bin"
    host_bin.write_bytes(m.ctl("binary_runtime_measurements").read_bytes())
    r = imafs("verify-log", host_bin, "--child", a)
    assert f"created at entry 1 of host.bin; removed at entry 2" in r.stdout


@pytest.mark.parametrize("args,why", [
    (["--policy", "{w}/bad.policy"], "line 1, column 9"),
    (["--keys", "{w}/badkeys"], "is unusable"),
    (["--keys", "{w}"], "no certificate in it"),
    (["quota=3"], "quota=: '3': expected KIND:ENTRIES"),
    (["digest_lists=/x"], "digest_lists=: reserved for digest lists"),
    (["template=nope"], "unknown template"),
    (["--profile", "web", "--policy", "{w}/bad.policy"], "not both"),
    (["--profile", "nope", "--profiles", "{w}"], "no profile 'nope'"),
])
def test_ns_create_refusals_make_nothing(m, world_tmp, args, why):
    (world_tmp / "bad.policy").write_text("measure func=NOPE\n")
    (world_tmp / "badkeys").mkdir(exist_ok=True)
    (world_tmp / "badkeys" / "x.der").write_bytes(b"0\x82\x00\x05hello")
    before = len(host_list(m))
    rd = Reader()
    try:
        r = imafs("ns", "create", m.mnt, "web", "--pid", rd.pid,
                  *[a.format(w=world_tmp) for a in args], ok=False)
        assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert len(host_list(m)) == before
        assert ":/ns" not in Path(f"/proc/{rd.pid}/cgroup").read_text()   # not bound

        assert imafs("ns", "list", m.mnt).stdout.count("\n") == 1
    finally:
        rd.stop()


def test_ns_create_of_a_gone_process_or_a_taken_name(m):
    p = subprocess.Popen(["sleep", "0"])
    p.wait()
    r = imafs("ns", "create", m.mnt, "web", "--pid", p.pid, ok=False)
    assert r.returncode == 2 and f"--pid {p.pid}: No such process" in r.stderr
    rd = Reader()
    try:
        imafs("ns", "create", m.mnt, "web", "--pid", rd.pid)
        r = imafs("ns", "create", m.mnt, "web", "--pid", rd.pid, ok=False)
        assert "namespace /web exists" in r.stderr
        r = imafs("ns", "create", m.mnt, "x" * 65, "--pid", rd.pid, ok=False)
        assert "at most 64 characters" in r.stderr
    finally:
        rd.stop()


def test_not_an_imafs_mount(world_tmp, plain_mount):
    r = imafs("ns", "list", world_tmp, ok=False)
    assert "is not a mount point" in r.stderr
    r = imafs("ns", "list", "/proc", ok=False)
    assert "is not an imafs mount (it is a proc mount)" in r.stderr
    r = imafs("ns", "list", plain_mount.mnt, ok=False)      # --no-integrity: no socket
    assert "no control socket recorded" in r.stderr


def test_ns_create_inside_shares_the_grammar(m):
    """A hand-made container's ns-create: names up to 64 characters; options that name
    host files refused (EINVAL, the reason in the log); the slots refused as not built."""
    def inside(text):
        return subprocess.run(["unshare", "--fork", "--kill-child", "--pid",
                               f"--mount-proc={m.mnt}/proc", "chroot", str(m.mnt), "/bin/sh",
                               "-c", f"echo '{text}' > /.imafs/ns-create && echo in"],
                              capture_output=True, text=True, timeout=30)
    r = inside("y" * 64 + " appraise=log evm=log")
    assert r.stdout == "in\n", r.stderr
    assert (m.ctl("namespaces") / ("y" * 64)).is_dir()
    assert (m.ctl("namespaces") / ("y" * 64) / "evm").read_text() == "2"   # no HMAC key
    for text, why in (("web policy=/etc/motd", "policy=: ns-create: names a host file"),
                      ("web keys=/keys", "keys=: ns-create: names a host directory"),
                      ("web evm=enforce evm_key=/etc/motd",
                       "evm_key=: ns-create: names a host file"),
                      ("web evm=fix", "evm=: 'fix' is not one of enforce, log, off"),
                      ("web quota=5", "quota=: '5': expected"), ("z" * 65, "at most 64")):
        r = inside(text)
        assert r.returncode != 0 and "in" not in r.stdout
        assert wait_for(lambda: why in m.log_text()), (why, m.log_text()[-2000:])
    assert not (m.ctl("namespaces") / "web").exists()
