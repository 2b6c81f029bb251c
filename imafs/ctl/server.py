"""The daemon's control socket: ``STATE/control.sock``, a channel outside the mount.

``imafs ns ...`` and ``imafs oci-hook`` talk to the daemon here, so they work when
the mount is read-only (``root.readonly``) and never depend on what a container can
see or reach: the socket lives in the state directory, is root's, mode 0600, and the
daemon takes only peers that are **uid 0 of the daemon's own user namespace** (the
initial one when imafs runs on the host):

* SO_PEERCRED gives the peer's effective uid as the daemon's user namespace maps it
  (a container's root, uid 0 of a user namespace mapped elsewhere, reads as its
  host uid, or as the overflow uid 65534);
* uid 0 can still be root of a user namespace that maps 0 to 0 (``unshare -U
  --map-root-user`` run by root), whose capabilities are only its namespace's: so
  the peer's ``/proc/PID/ns/user`` must be the daemon's own. The pid is pinned by a
  pidfd first (SO_PEERPIDFD, Linux 6.5; else pidfd_open of SO_PEERCRED's pid), and
  the pidfd is checked to still be alive after the namespace was read, so the
  ``/proc`` entry read was the peer's.

Requests (protocol.py) are read one at a time per connection, their engine work runs
in worker threads (at most protocol.WORKERS at once, trio's event loop -- the FUSE
loop -- never waits on it), and every bound of protocol.py is enforced here.
"""
from __future__ import annotations

import array
import base64
import binascii
import errno
import logging
import os
import signal
import socket
import stat
import struct

import trio

from imafs.ctl import protocol as P
from imafs.ima.digest_cache import DigestListRefused
from imafs.ima.hostns import CreateRequest, HostNamespaces, Target
from imafs.ima.namespaces import NamespaceError
from imafs.logutil import PrintableLogFilter

log = logging.getLogger("imafs.ctl")
log.addFilter(PrintableLogFilter())

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class PeerRefused(Exception):
    pass


def listen(state_dir: str) -> socket.socket:
    """The listening socket ``STATE/control.sock`` (a stale one removed: the caller
    holds the state's lock), root's, mode 0600, bound through the state directory's
    descriptor so that a long state path does not exceed sun_path."""
    dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise OSError(errno.EPERM, f"state directory {state_dir} is writable by others "
                                       f"or not the daemon's: no control socket in it")
        try:
            os.unlink(P.SOCKET_NAME, dir_fd=dfd)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(f"/proc/self/fd/{dfd}/{P.SOCKET_NAME}")
        except OSError:
            s.close()
            raise
        finally:
            os.umask(old)
        sst = os.stat(P.SOCKET_NAME, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISSOCK(sst.st_mode) or sst.st_mode & 0o077:
            s.close()
            raise OSError(errno.EPERM, "control socket has the wrong type or mode")
        s.listen(P.MAX_CONNECTIONS)
        return s
    finally:
        os.close(dfd)


def _same_userns(pid: int) -> bool:
    mine = os.stat("/proc/self/ns/user")
    theirs = os.stat(f"/proc/{pid}/ns/user")
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except OSError:
        return False


def check_peer(sock) -> tuple[int, int]:
    """(pid, uid) of a peer that may use the socket; PeerRefused saying why not."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                           socket.SO_PEERCRED, 12))
    if uid != 0:
        raise PeerRefused(f"uid {uid} (pid {pid}) is not root of the daemon's user "
                          f"namespace: the control socket is root's")
    pidfd = None
    try:
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            pidfd = os.pidfd_open(pid) if pid > 0 else None
    except OSError:
        pidfd = None
    if pidfd is None:
        raise PeerRefused(f"pid {pid}: the peer has exited (or cannot be pinned)")
    try:
        try:
            same = _same_userns(pid)
        except OSError as e:
            raise PeerRefused(f"pid {pid}: its user namespace cannot be read: "
                              f"{e.strerror}") from None
        if not _alive(pidfd):
            raise PeerRefused(f"pid {pid}: the peer exited while it was checked")
        if not same:
            raise PeerRefused(f"pid {pid} is uid 0 of another user namespace (a "
                              f"container's or rootless runtime's root), not of the "
                              f"daemon's: the control socket is the host root's")
    finally:
        os.close(pidfd)
    return pid, uid


class Handlers:
    """The operations, run in worker threads: protocol arguments -> engine calls."""

    def __init__(self, host: HostNamespaces, info: dict, lists=None):
        self.host = host
        self.info = info        # mountpoint, dev, pid, state
        self.lists = lists      # imafs.ima.digest_cache.HostLists

    def __call__(self, op: str, args: dict, fds: dict, peer: tuple[int, int]) -> dict:
        try:
            return getattr(self, "op_" + op.replace("-", "_"))(args, fds, peer)
        except (NamespaceError, P.ProtocolError, DigestListRefused) as e:
            log.warning("control socket: %s by pid %d refused: %s", op, peer[0], e)
            if op in ("ns-create", "ns-remove") and self.host.audit is not None:
                self.host.audit.record(op.replace("-", "_") + "_rejected", ns="/",
                                       pid=peer[0], uid=peer[1], via="control socket",
                                       name=str(args.get("name", ""))[:80], error=str(e))
            return P.refusal(str(e), e.errno)

    def op_hello(self, args, fds, peer) -> dict:
        return P.reply(versions=list(P.VERSIONS), **self.info)

    def op_ns_create(self, args, fds, peer) -> dict:
        name = _arg(args, "name", str)
        pid = _arg(args, "pid", int)
        if pid <= 0:
            raise P.ProtocolError(f"pid {pid}: not a process id")
        options = _arg(args, "options", dict, {})
        policy = _arg(args, "policy", str, None)
        certs = []
        for i, c in enumerate(_arg(args, "certs", list, []), 1):
            if not isinstance(c, str):
                raise P.ProtocolError(f"certs: item {i} is not a base64 string")
            try:
                certs.append(base64.b64decode(c, validate=True))
            except (binascii.Error, ValueError):
                raise P.ProtocolError(f"certs: item {i} is not base64") from None
        model = _arg(args, "model", str, None)
        req = CreateRequest(name=name, target=Target(pid, fds.get("pidfd")), options=options,
                            policy=policy, certs=certs, model=model, uid=peer[1])
        out = self.host.create(req)
        log.info("control socket: pid %d made namespace %s (id %d) for pid %d", peer[0],
                 out["path"], out["id"], pid)
        return P.reply(namespace=out)

    def op_model_export(self, args, fds, peer) -> dict:
        out = self.host.model_export(_arg(args, "ns", str), limit=P.MAX_RESPONSE - 4096)
        return P.reply(**out)

    def op_ns_list(self, args, fds, peer) -> dict:
        return P.reply(namespaces=self.host.list())

    def op_ns_remove(self, args, fds, peer) -> dict:
        name = _arg(args, "name", str)
        uuid = _arg(args, "uuid", str, None)
        out = self.host.remove(name, uuid=uuid, archive_fd=fds.get("archive"), uid=peer[1])
        log.info("control socket: pid %d removed namespace %s (id %d)%s", peer[0],
                 out["path"], out["id"],
                 f", archived as {out['archive']}" if "archive" in out else "")
        return P.reply(namespace=out)


    def op_digest_list_add(self, args, fds, peer) -> dict:
        """A list file (``path``, as the requester sees it) into namespace ``ns`` (a
        path from the root; default the root), as digest_list_add does."""
        out = self._lists().add(_arg(args, "ns", str, ""), _arg(args, "path", str), peer[0],
                                fds.get("pidfd"))
        log.info("control socket: pid %d loaded digest list %s into namespace %s", peer[0],
                 out["label"], out["namespace"])
        return P.reply(digest_list=out)

    def op_digest_list_del(self, args, fds, peer) -> dict:
        """A loaded list (``list``: its path, or its name) out of namespace ``ns``."""
        out = self._lists().remove(_arg(args, "ns", str, ""), _arg(args, "list", str),
                                   peer[0], fds.get("pidfd"))
        return P.reply(digest_list=out)

    def _lists(self):
        if self.lists is None:
            raise P.ProtocolError("this daemon keeps no digest lists", errno.EOPNOTSUPP)
        return self.lists


_KINDS = {int: "number", str: "string", dict: "JSON object", list: "list"}


def _arg(args: dict, key: str, kind, default=...):
    if key not in args or args[key] is None:
        if default is ...:
            raise P.ProtocolError(f"argument {key!r} missing")
        return default
    v = args[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise P.ProtocolError(f"argument {key!r} must be a {_KINDS[kind]}")
    return v


class Server:
    """Serves one listening socket on trio's loop (start it in the daemon's nursery)."""

    def __init__(self, sock: socket.socket, handlers: Handlers):
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.handlers = handlers
        self.limiter = trio.CapacityLimiter(P.WORKERS)
        self.connections = 0

    async def serve(self) -> None:
        """Accept and serve connections until cancelled. Nothing a connection does
        ends this loop or the daemon: every error is one log line."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await self.sock.accept()
                except OSError as e:        # EMFILE, ENOBUFS: wait, then go on
                    log.warning("control socket: accept: %s", e.strerror or e)
                    await trio.sleep(0.1)
                    continue
                if self.connections >= P.MAX_CONNECTIONS:
                    nursery.start_soon(self._busy, conn)
                    continue
                self.connections += 1
                nursery.start_soon(self._connection, conn)

    async def _busy(self, conn) -> None:
        with conn:
            with trio.move_on_after(1):
                try:
                    await _sendall(conn, P.encode(P.refusal(
                        f"the daemon serves {P.MAX_CONNECTIONS} control connections at "
                        f"once: try again", errno.EAGAIN)))
                except OSError:
                    pass

    async def _connection(self, conn) -> None:
        try:
            with conn:
                try:
                    peer = check_peer(conn)
                except (PeerRefused, OSError) as e:
                    log.warning("control socket: connection refused: %s", e)
                    await self._tell(conn, P.refusal(str(e), errno.EACCES))
                    return
                buf = bytearray()
                while True:
                    fds: list[int] = []
                    try:
                        line = await self._read_line(conn, buf, fds)
                        if line is None:
                            return
                        answer = await self._answer(line, fds, peer)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    with trio.move_on_after(P.REQUEST_TIMEOUT):
                        await _sendall(conn, P.encode(answer))
                        continue
                    return
        except OSError as e:
            log.debug("control connection: %s", e)
        except Exception as e:  # noqa: BLE001 - a bug must not take the mount down
            log.error("control connection failed: %s: %s", type(e).__name__, e,
                      exc_info=True)
        finally:
            self.connections -= 1

    async def _read_line(self, conn, buf: bytearray, fds: list[int]) -> bytes | None:
        """The next request line (None: the peer closed, timed out or broke a bound:
        then it was told why), the descriptors that came with it in ``fds``."""
        first = True
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                return line
            if len(buf) > P.MAX_REQUEST:
                await self._tell(conn, P.refusal(f"a request over {P.MAX_REQUEST} bytes",
                                                 errno.EMSGSIZE))
                return None
            timeout = P.IDLE_TIMEOUT if first and not buf else P.REQUEST_TIMEOUT
            with trio.move_on_after(timeout) as cs:
                data, anc, flags, _ = await conn.recvmsg(
                    1 << 16, socket.CMSG_SPACE(P.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            if cs.cancelled_caught:
                if buf:
                    await self._tell(conn, P.refusal("request not complete in time",
                                                     errno.ETIMEDOUT))
                return None
            first = False
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC or len(fds) > P.MAX_FDS:
                await self._tell(conn, P.refusal(f"more than {P.MAX_FDS} descriptors "
                                                 f"with one request", errno.EMSGSIZE))
                return None
            if not data:
                return None
            buf += data

    async def _tell(self, conn, answer: dict) -> None:
        with trio.move_on_after(1):
            try:
                await _sendall(conn, P.encode(answer))
            except OSError:
                pass

    async def _answer(self, line: bytes, fds: list[int], peer) -> dict:
        try:
            op, args = P.check_request(P.decode(line))
            names = args.pop("fds", [])
            if len(names) != len(fds):
                raise P.ProtocolError(f"the request names {len(names)} descriptor(s) and "
                                      f"carries {len(fds)}")
            named = dict(zip(names, fds))
        except P.ProtocolError as e:
            return P.refusal(str(e), e.errno)
        try:
            return await trio.to_thread.run_sync(self.handlers, op, args, named, peer,
                                                 limiter=self.limiter)
        except Exception as e:  # noqa: BLE001 - a bug: refuse this request, keep serving
            log.error("control socket: %s failed: %s: %s", op, type(e).__name__, e,
                      exc_info=True)
            return P.refusal(f"{op} failed in the daemon: {type(e).__name__}: {e}",
                             errno.EIO)


async def _sendall(conn, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await conn.send(view)
        view = view[n:]
