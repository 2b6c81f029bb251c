"""A client of a mount's control socket (protocol.py), for ``imafs ns`` and
``imafs oci-hook``.

:meth:`Client.for_mount` finds the daemon of a mount point and checks, before it
sends anything, that it is talking to that mount's daemon: the mount point must be
an imafs mount (``fuse.imafs`` in mountinfo); its daemon's record
(``/run/imafs/<hash>.json``, written at mount) names the socket; the record, its
directory and the socket must be root's and writable by nobody else; the daemon at
the other end must be root (SO_PEERCRED) and the pid the record names; and its
``hello`` must name the same mount device as this process's mountinfo. Each failed
check is one clear :class:`CtlError`.

Only root of the host's user namespace may use the socket (the daemon checks it;
:func:`check_caller` says so first, in words a rootless runtime's user understands).
"""
from __future__ import annotations

import os
import socket
import stat
import struct

from imafs.ctl import protocol as P

ROOTLESS_DOC = "docs/namespaces.md, \"Rootless containers\""


class CtlError(Exception):
    """A refusal, one line; ``errno`` names the daemon's errno when it refused."""

    def __init__(self, msg: str, errno: str = ""):
        super().__init__(msg)
        self.errno = errno


def _in_initial_userns() -> bool:
    """Whether this process's user namespace maps every uid to itself (the initial
    one does: "0 0 4294967295")."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = [ln.split() for ln in f if ln.strip()]
    except OSError:
        return True
    return lines == [["0", "0", "4294967295"]]


def check_caller(what: str = "imafs") -> None:
    """CtlError, in words, when this process cannot use a control socket: not root,
    or root of a user namespace (a rootless runtime)."""
    euid = os.geteuid()
    if euid != 0:
        raise CtlError(f"{what} runs as uid {euid}, not root: the control socket is the "
                       f"host root's, so a rootless runtime (or a user's hook) cannot make "
                       f"integrity namespaces ({ROOTLESS_DOC})")
    if not _in_initial_userns():
        raise CtlError(f"{what} runs as root of a user namespace (a rootless runtime's, or "
                       f"a container's), not of the host: the control socket takes only "
                       f"the host's root ({ROOTLESS_DOC})")


def mount_entry(mnt: str) -> dict | None:
    from imafs.fs.daemon import _fuse_mount_of
    return _fuse_mount_of(mnt)


def _check_owned(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise CtlError(f"{what} {path} is not root's alone (uid {st.st_uid}, mode "
                       f"{stat.S_IMODE(st.st_mode):04o}): refusing to trust it")


class Client:
    def __init__(self, sock: socket.socket, info: dict, timeout: float = 120.0):
        self.sock = sock
        self.info = info
        self.sock.settimeout(timeout)
        self._buf = b""

    @classmethod
    def for_mount(cls, mnt: str, *, state: str | None = None,
                  timeout: float = 120.0) -> "Client":
        """A connected client of the daemon that serves mount point ``mnt``
        (``state``: its state directory, when /run/imafs holds no record of it)."""
        from imafs.fs.daemon import RUN_DIR, mount_record, resolve_mountpoint
        check_caller()
        real = resolve_mountpoint(mnt)
        m = mount_entry(real)
        if m is None:
            raise CtlError(f"{mnt} is not a mount point")
        if m["fstype"] != "fuse.imafs":
            raise CtlError(f"{mnt} is not an imafs mount (it is a {m['fstype']} mount)")
        rec = None
        if state is None:
            rec = mount_record(real)
            if rec is None or not rec.get("socket"):
                raise CtlError(f"no control socket recorded for {mnt} under {RUN_DIR} (a "
                               f"daemon without one: see its log; or give --state DIR)")
            for p in (RUN_DIR, os.path.join(RUN_DIR, os.path.basename(
                    _record_path(real)))):
                _check_owned(p, os.lstat(p), "daemon record")
            state = rec["state"]
        try:
            sock = connect(state, timeout)
        except OSError as e:
            raise CtlError(f"cannot reach the daemon of {mnt} at "
                           f"{os.path.join(state, P.SOCKET_NAME)}: {e.strerror or e}") from None
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_PEERCRED, 12))
            if uid != 0:
                raise CtlError(f"the control socket of {mnt} is served by uid {uid}, not "
                               f"root: refusing to use it")
            if rec is not None and rec.get("pid") not in (None, pid):
                raise CtlError(f"the control socket of {mnt} is served by pid {pid}, not "
                               f"by the mount's daemon (pid {rec.get('pid')})")
            c = cls(sock, {}, timeout)
            hello = c.call("hello")
            if hello.get("dev") != m["dev"]:
                raise CtlError(f"the daemon at {state} serves another mount "
                               f"({hello.get('mountpoint')}, device {hello.get('dev')}), "
                               f"not {mnt} (device {m['dev']})")
            c.info = hello
            return c
        except BaseException:
            sock.close()
            raise

    def call(self, op: str, *, fds: dict[str, int] | None = None, **args) -> dict:
        """One request; its answer (ok), or CtlError with the daemon's reason."""
        fds = fds or {}
        req = {"v": P.VERSION, "op": op, **{k: v for k, v in args.items() if v is not None}}
        if fds:
            req["fds"] = list(fds)
        data = P.encode(req)
        try:
            try:
                if fds:
                    n = socket.send_fds(self.sock, [data], list(fds.values()))
                    data = data[n:]
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                # a daemon at its connection limit answers before it reads and closes:
                # its reason may be waiting to be read
                pass
            line = self._read_line()
        except socket.timeout:
            raise CtlError(f"{op}: the daemon did not answer in time") from None
        except OSError as e:
            raise CtlError(f"{op}: control socket: {e.strerror or e}") from None
        try:
            ans = P.decode(line, limit=P.MAX_RESPONSE)
        except P.ProtocolError as e:
            raise CtlError(f"{op}: bad answer from the daemon: {e}") from None
        if not ans.get("ok"):
            raise CtlError(str(ans.get("error") or "refused"), str(ans.get("errno", "")))
        return ans

    def _read_line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > P.MAX_RESPONSE:
                raise OSError(0, f"an answer over {P.MAX_RESPONSE} bytes")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise OSError(0, "the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record_path(mnt: str) -> str:
    from imafs.fs.daemon import _infofile
    return _infofile(mnt)


def connect(state: str, timeout: float = 120.0) -> socket.socket:
    """A socket connected to ``STATE/control.sock`` (through the directory's
    descriptor: no sun_path limit), after checking that the socket file is root's,
    a socket, mode 0600 or stricter."""
    dfd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.stat(P.SOCKET_NAME, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(0, f"{P.SOCKET_NAME} is not a socket")
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise OSError(0, f"{P.SOCKET_NAME} is not root's alone (uid {st.st_uid}, mode "
                             f"{stat.S_IMODE(st.st_mode):04o})")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(f"/proc/self/fd/{dfd}/{P.SOCKET_NAME}")
        except OSError:
            s.close()
            raise
        return s
    finally:
        os.close(dfd)
