"""The control files that are written: ``policy`` and ``keys`` (what one open writes is
checked as it comes and applied at close, all of it or nothing), ``query`` (a path in,
the engine's explanation out), ``ns-create``, ``ns-join`` and ``ns-remove``.

Sessions of ima/securityfs_read.py's :class:`Session` (see there for the interface);
a refusal logs one line saying which file refused what and why (what the writer sent
quoted, its control characters escaped by the log's filter), writes the file's audit
record (all but ``query``'s) and raises :class:`SecurityfsError` with the errno.
"""
from __future__ import annotations

import errno
import json
import os

from imafs.ima.binding import Opener
from imafs.ima.iint import AccessDenied, Subject, settle
from imafs.ima.hooks import OpenMode
from imafs.ima.model_secfs import read_model_file
from imafs.ima.keyring_update import (MAX_KEY_BYTES, MAX_KEYS_WRITE, KeyInput, KeyringUpdate,
                                      key_items)
from imafs.ima.namespaces import NamespaceError
from imafs.ima.pidns import own_key, top_key
from imafs.ima.policy import MAX_POLICY_BYTES, MAY_READ, Policy, PolicyError
from imafs.ima.policy_parse import parse_policy
from imafs.ima.query import own_view
from imafs.ima.securityfs_read import Session, SecurityfsError, log, quote

MAX_QUERY_BYTES = 4096
MAX_NS_WRITE = 4096             # what one write to ns-create, ns-join or ns-remove may hold
# rules one namespace's policy may hold: every open is matched against the policy of
# its namespace and of every ancestor, rule by rule (about 1.5 us a rule here)
MAX_POLICY_RULES = 4096
SIGNED_POLICY_REQUIRED = "signed policy file (specified as an absolute pathname) required"

NS_CREATE_USAGE = """\
Write "NAME [template=T] [hash=ALGO] [appraise=enforce|log|fix|off] [evm=enforce|log|off]
[model=learn|PATH]" here to create a child integrity namespace of your own and move the
process that opened this file (and every process it creates afterwards) into it: for
"echo NAME > ns-create" that is the shell itself. One namespace per open. The child
starts with an empty policy, an empty keyring and its own measurement list and PCRs;
your namespace's rules still apply to it. model= gives it a behaviour model, learning,
or loaded from the model file PATH inside the mount (appraised as a policy file). Its
files appear here under namespaces/NAME/. Remove it with "NAME" > ns-remove.
"""


# --------------------------------------------------------------------------- staged

class StagedWrite(Session):
    """A file whose writes through one open are checked as they come and applied
    together when it is closed, only if no write of that open was refused -- the kernel
    cuts a large ``write(2)`` into FUSE writes (and shells write line by line), so the
    unit can only be the whole open. Over the file's byte limit: EFBIG at the crossing
    write, every later one and the close."""

    VERB = "applied"

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.pending = bytearray()      # an incomplete line or certificate
        self.written = 0                # bytes written through this open
        self.refused = 0                # a write of this open was refused (its errno)
        self.why = ""                   # ... and why
        self.told = False               # a close has said so (flush of an over-size open)

    def after_refusal(self) -> str:
        return (f"an earlier write through this open was refused ({self.why}); nothing "
                f"of this open is {self.VERB}")

    def flush(self) -> None:
        if self.refused == errno.EFBIG:
            # over the size limit: the write(2) that crossed it may well have returned
            # a short count (the kernel reports what it passed on before the refusal),
            # so the close logs it too. close(2) itself succeeds, as the kernel's
            # release of the policy file does (the mount answers no FLUSH: this runs
            # at release): a later write on the open fails, and a tool that retries
            # the short write sees it.
            if not self.told:
                self.told = True
                log.warning("%s open by pid %d in namespace %s closed with nothing %s: %s",
                            self.name, self.pid, self.ns.path, self.VERB, self.why)
            raise SecurityfsError(errno.EFBIG, self.why)
        self.apply()

    def apply(self) -> None:
        """At close: take what this open wrote."""

    def close(self) -> None:
        # a refused open applies nothing; over the size limit, its close logs so
        if not self.refused or self.refused == errno.EFBIG:
            try:
                self.flush()
            except SecurityfsError:
                pass


# --------------------------------------------------------------------------- policy

class PolicyFile(StagedWrite):
    """``policy``: as the kernel's securityfs file, rules written through one open are
    parsed as they come (a bad line fails its write with EINVAL) and loaded together at
    close. Over MAX_POLICY_BYTES through one open, or a policy over MAX_POLICY_RULES
    rules: EFBIG. A partial last line waits for the next write; line numbers in errors
    count from the first byte written through the open. As the kernel's
    ima_write_policy: once the namespace's policy appraises POLICY_CHECK
    (IMA_APPRAISE_POLICY), rules are taken only from a policy file named by its
    absolute path (appraised as POLICY_CHECK); text is EACCES."""

    VERB = "loaded"

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.rules: list = []           # parsed, loaded at close
        self.lines = 0                  # lines already parsed through this open

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return ns.policy.text().encode()

    def refuse(self, err: int, msg: str, **extra):
        self.pending.clear()
        self.rules.clear()
        if not self.refused:
            self.refused, self.why = err, msg
        log.warning("policy write to namespace %s rejected (pid %d): %s", self.ns.path,
                    self.pid, msg)
        self.fs.engine.audit.record("policy_rejected", ns=self.ns.path, pid=self.pid,
                                    uid=self.uid, error=msg, **extra)
        raise SecurityfsError(err, msg)

    def write(self, buf: bytes, final: bool = False) -> int:
        """``final``: the newline flush adds to end a last line written without one
        (not the writer's: it does not count against the size limit)."""
        if self.refused:
            self.refuse(self.refused, self.after_refusal(), cause="earlier refusal")
        if not final:
            self.written += len(buf)
        if self.written > MAX_POLICY_BYTES:
            self.refuse(errno.EFBIG, f"over {MAX_POLICY_BYTES} bytes written through one open")
        data = bytes(self.pending) + buf
        cut = data.rfind(b"\n")
        if cut < 0:
            self.pending[:] = data
            return len(buf)
        complete, rest = data[:cut + 1], data[cut + 1:]
        stripped = complete.strip()
        try:
            if stripped.startswith(b"/") and b"\n" not in stripped:
                rules = self._from_file(os.fsdecode(stripped))
            elif stripped and appraises_policy(self.ns.policy):
                self.refuse(errno.EACCES, SIGNED_POLICY_REQUIRED,
                            cause="signed policy required")
            else:
                rules = parse_policy(complete)
        except _PolicyDenied as e:
            self.refuse(e.errno, str(e), cause="policy file refused")
        except PolicyError as e:
            if e.line and not e.source:       # a line of this write: count from the open
                e = PolicyError(e.msg, e.line + self.lines, e.col)
            self.refuse(errno.EINVAL, str(e))
        self.lines += complete.count(b"\n")
        self.pending[:] = rest
        if len(self.ns.policy) + len(self.rules) + len(rules) > MAX_POLICY_RULES:
            self.refuse(errno.EFBIG, f"a policy holds at most {MAX_POLICY_RULES} rules")
        self.rules.extend(rules)
        return len(buf)

    def apply(self) -> None:
        if self.pending and not self.refused:
            self.write(b"\n", True)
        if self.rules:
            self._load()

    def _load(self) -> None:
        """Append the rules written through this open to its namespace's policy: stored
        first, then in force (a state that cannot be written -- a full disk -- leaves
        the old policy in place: EIO)."""
        rules, self.rules = self.rules, []
        if self.refused or not rules:
            return
        ns, eng = self.ns, self.fs.engine
        with self.fs.policy_lock:
            if len(ns.policy) + len(rules) > MAX_POLICY_RULES:
                self.refuse(errno.EFBIG, f"a policy holds at most {MAX_POLICY_RULES} rules")
            old = ns.policy
            ns.set_policy(Policy(list(old.rules) + rules))
            try:
                eng.tree.save_policy(ns)
            except Exception as e:  # noqa: BLE001 - lmdb.Error: keep the old policy
                ns.set_policy(old)
                log.error("policy of namespace %s not changed: cannot store it: %s", ns.path, e)
                eng.audit.record("policy_rejected", ns=ns.path, pid=self.pid, uid=self.uid,
                                 error=f"cannot store the policy: {e}")
                raise SecurityfsError(errno.EIO, f"cannot store the policy: {e}") from None
        eng.audit.record("policy_update", ns=ns.path, pid=self.pid, uid=self.uid,
                         rules=len(rules), total=len(ns.policy))
        log.info("namespace %s: %d rule(s) added by pid %d (%d in all)", ns.path,
                 len(rules), self.pid, len(ns.policy))

    def _from_file(self, path: str):
        """A policy loaded by path (inside the mount), measured and appraised as
        POLICY_CHECK by the policies of the namespace it is loaded into and of its
        ancestors (the writer's own namespace is one of them); a refused appraisal is
        EACCES, as the kernel's ima_read_policy."""
        eng = self.fs.engine
        try:
            f = self.fs.open_file(path)
        except OSError as e:
            raise PolicyError(f"{path}: {e.strerror}") from None
        fd, size = f.fd, f.st.st_size
        if size > MAX_POLICY_BYTES:     # before anything hashes it
            os.close(fd)
            raise _PolicyDenied(f"{path}: policy file over {MAX_POLICY_BYTES} bytes "
                                f"({size})", errno.EFBIG)
        state = None
        try:
            with eng.tree.acting_as(self.pid, self.ns):
                state = settle(eng.file_open(Subject(self.pid, self.uid, self.gid), f,
                                             OpenMode(), funcs=[("POLICY_CHECK", MAY_READ)]))
            text = os.pread(fd, size, 0)
        except AccessDenied as e:        # appraisal (EACCES), a list that is full (EIO)
            raise _PolicyDenied(f"{path}: {e}", e.errno) from None
        except OSError as e:
            raise PolicyError(f"{path}: {e.strerror}")
        except Exception as e:  # noqa: BLE001 - any other refusal
            raise PolicyError(f"{path}: {e}")
        finally:
            if state is not None:     # a reader no more (ToMToU, open_writers)
                eng.file_release(state)
            os.close(fd)
        try:
            return parse_policy(text)
        except PolicyError as e:
            raise e.with_source(path)


class _PolicyDenied(Exception):
    """A policy file the engine refused to open (its POLICY_CHECK appraisal)."""

    def __init__(self, msg: str, err: int):
        super().__init__(msg)
        self.errno = err or errno.EACCES


def appraises_policy(policy) -> bool:
    """The kernel's IMA_APPRAISE_POLICY: some rule appraises POLICY_CHECK."""
    return any(r.action == "appraise" and r.func == "POLICY_CHECK" for r in policy.rules)


# --------------------------------------------------------------------------- keys

class KeysFile(StagedWrite):
    """``keys``: certificates (DER, PEM, PEM after text), ``/PATH`` lines and ``remove
    KEYID [SHA256]`` (ima/keyring_update.py). As the policy file: what one open writes
    is checked as it comes (a certificate the keyring would refuse, a path that cannot
    be read, a key that is not there: that write() fails with EINVAL, the reason in the
    log and audit log, and nothing of the open is applied) and applied when the file is
    closed, all of it or nothing (a store failure half-way is undone: EIO)."""

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.update = KeyringUpdate(ns.keyring, ns.path)

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return ns.keyring.list_text().encode()

    def refuse(self, msg: str, err: int = errno.EINVAL):
        self.pending.clear()
        self.update.clear()
        if not self.refused:
            self.refused, self.why = err, msg
        log.warning("key write to namespace %s rejected (pid %d): %s", self.ns.path,
                    self.pid, msg)
        self.fs.engine.audit.record("key_rejected", ns=self.ns.path, pid=self.pid,
                                    uid=self.uid, error=msg)
        raise SecurityfsError(err, msg)

    def write(self, buf: bytes, final: bool = False) -> int:
        if self.refused:
            self.refuse(self.after_refusal(), self.refused)
        self.written += len(buf)
        if self.written > MAX_KEYS_WRITE:
            self.refuse(f"over {MAX_KEYS_WRITE} bytes written through one open", errno.EFBIG)
        data = bytes(self.pending) + buf
        self.pending.clear()
        try:
            items, rest = key_items(data, final)
            if len(rest) > MAX_KEY_BYTES:
                raise KeyInput(f"an incomplete certificate of over {MAX_KEY_BYTES} bytes",
                               errno.EFBIG)
            if items:
                self.update.stage(items, self._read_file)
        except KeyInput as e:
            self.refuse(str(e), e.errno)
        self.pending[:] = rest
        if final:
            self._commit()
        return len(buf)

    def apply(self) -> None:
        if (self.pending or self.update) and not self.refused:
            self.write(b"", True)

    def _read_file(self, path: str) -> bytes:
        """The bytes of a certificate file named by a ``/PATH`` line (OSError)."""
        f = self.fs.open_file(path)
        try:
            if f.st.st_size > MAX_KEYS_WRITE:
                raise OSError(errno.EFBIG, f"over {MAX_KEYS_WRITE} bytes")
            return os.pread(f.fd, MAX_KEYS_WRITE, 0)
        finally:
            os.close(f.fd)

    def _commit(self) -> None:
        if not self.update or self.refused:
            self.update.clear()
            return
        try:
            with self.fs.keys_lock:
                done = self.update.commit()
        except KeyInput as e:
            self.refuse(str(e), e.errno)
        audit, ns = self.fs.engine.audit, self.ns
        for op in done:
            if op[0] == "add":
                info = op[1]
                audit.record("key_added", ns=ns.path, pid=self.pid, uid=self.uid,
                             keyid=f"{info.keyid:08x}", subject=info.subject)
                log.info("namespace %s: key %08x added (%s)", ns.path, info.keyid,
                         info.subject)
            else:
                for k in op[1]:
                    audit.record("key_removed", ns=ns.path, pid=self.pid, uid=self.uid,
                                 keyid=f"{k.keyid:08x}", subject=k.subject,
                                 fingerprint=k.fingerprint.hex())
                    log.info("namespace %s: key %08x removed (%s)", ns.path, k.keyid,
                             k.subject)


# --------------------------------------------------------------------------- query

class QueryFile(Session):
    """``query``: write a path inside the mount (``exec PATH``: as executed), one per
    write on one line (a missing final newline is fine: printf), then read what the
    engine decides about it for the writer, and why (ima/query.py). Refusals are
    logged, not audited."""

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.result: bytes | None = None

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return fs.last_query.get((ns.id, uid), b"")

    def read(self, off: int, size: int) -> bytes:
        if self.result is not None:
            return self.result[off:off + size]
        return super().read(off, size)

    def refuse(self, msg: str, err: int = errno.EINVAL):
        log.warning("query write to namespace %s rejected (pid %d): %s", self.ns.path,
                    self.pid, msg)
        raise SecurityfsError(err, msg)

    def write(self, buf: bytes) -> int:
        if len(buf) > MAX_QUERY_BYTES:
            self.refuse(f"over {MAX_QUERY_BYTES} bytes written ({len(buf)}): "
                        f"write one path inside the mount")
        given = [ln for ln in buf.split(b"\n") if ln.strip()]
        if not given:
            self.refuse("nothing to query: write a path inside the mount, or 'exec PATH'")
        if len(given) > 1:
            self.refuse(f"one path per write, got {len(given)} lines: {quote(buf)}")
        words = given[0].split()
        exec_ = False
        if words[0] == b"exec" and len(words) == 2:
            exec_, words = True, words[1:]
        if len(words) != 1:
            self.refuse(f"expected PATH or 'exec PATH', got {len(words)} words: "
                        f"{quote(given[0])}")
        path = os.fsdecode(words[0])
        try:
            f = self.fs.open_file(path)
        except OSError as e:
            if e.errno == errno.EINVAL:       # not a path we answer for (not a file)
                self.refuse(f"{path}: {e.strerror}")
            result = {"path": path, "error": e.strerror}
        else:
            try:
                result = own_view(self.fs.engine.explain(
                    Subject(self.pid, self.uid, self.gid), f, exec_=exec_))
            except OSError as e:
                result = {"path": path, "error": e.strerror}
            finally:
                os.close(f.fd)
        out = (json.dumps(result, indent=2, default=str) + "\n").encode()
        self.result = out
        self.fs.last_query[(self.ns.id, self.uid)] = out
        return len(buf)


# --------------------------------------------------------------------------- namespaces

class NsFile(Session):
    """``ns-create``, ``ns-join``, ``ns-remove``: one request per write ("NAME
    [template=T] [hash=H] [appraise=M]", "NAME[/NAME...]", "NAME"). ns-create and
    ns-join move the process that opened the file (``Opener``, held by a pidfd: a FUSE
    write has no caller). One move per open; a write is refused (EPERM) when the opener
    has exited (or is exiting) or is no longer in the namespace it was in at open --
    else a second write through a kept descriptor, or one by a child on an inherited
    descriptor after its parent exited and its pid was reused, would move a process out
    of its namespace or move an unrelated one."""

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        # the process a write will move: the opener, held by a pidfd so that a reused
        # pid is never taken for it
        self.opener: Opener | None = (Opener(caller.pid)
                                      if self.writing and node.moves_opener else None)
        self.moved = False          # this open already moved its opener

    def write(self, buf: bytes) -> int:
        text = buf.decode("utf-8", "replace").strip()
        try:
            if len(buf) > MAX_NS_WRITE:
                raise NamespaceError(errno.EINVAL, f"over {MAX_NS_WRITE} bytes written "
                                                   f"({len(buf)})")
            if b"\0" in buf:
                raise NamespaceError(errno.EINVAL, f"a NUL byte in {quote(buf)}")
            if self.node.moves_opener and self.moved:
                raise NamespaceError(errno.EINVAL, f"this open of {self.name} has already "
                                                   f"moved its opener (pid {self.pid}); "
                                                   f"open it again")
            self.request(text)
        except NamespaceError as e:
            log.warning("%s by pid %d refused: %s", self.name, self.pid, e)
            self.fs.engine.audit.record(self.node.rejected, ns=self.ns.path, pid=self.pid,
                                        uid=self.uid, error=str(e))
            raise SecurityfsError(e.errno, str(e)) from None
        return len(buf)

    def request(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.opener is not None:
            self.opener.close()
            self.opener = None

    def _check_opener(self) -> None:
        """The opener may still be moved: it exists, is not exiting, and is in the
        namespace it was in at open (read afresh). Nothing to check without a binder
        (no process is moved then)."""
        tree = self.fs.engine.tree
        binder = tree.binder
        if binder is None:
            return
        op = self.opener
        gone = NamespaceError(errno.EPERM, f"the process that opened {self.name} (pid "
                                           f"{self.pid}) has exited: nobody to move")
        if op is None or not op.alive():
            raise gone
        now = binder.read_ns(op.pid)
        if not op.alive():
            raise gone
        if now != self.ns.id:
            where = "an unknown namespace" if now is None else (
                tree.by_id[now].path if now in tree.by_id else f"namespace id {now}")
            raise NamespaceError(errno.EPERM, f"the process that opened {self.name} (pid "
                                              f"{self.pid}) has left namespace "
                                              f"{self.ns.path} (it is in {where})")

    #: ns-create binds the opener's pid namespace when it has one of its own (the
    #: whole container); ns-join moves the opener alone (binding.py)
    WHOLE_PIDNS = True

    def _bind_opener(self, ns) -> None:
        """Move the opener into ns; BindingError-like exceptions when it did not move."""
        binder = self.fs.engine.tree.binder
        if binder is None:
            return
        how = binder.bind(self.opener.pid, ns.id,   # checks that it is there
                          whole_pidns=self.WHOLE_PIDNS)
        if not self.opener.alive():
            raise OSError(errno.ESRCH, f"pid {self.pid} exited while it was moved")
        self.bound_by = how


class NsCreate(NsFile):
    """``ns-create``: a child of the opener's namespace; the opener moves into it
    (NamespaceTree.ns_create records it first, and removes it again when the opener
    cannot be moved). Reading it gives its usage."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return NS_CREATE_USAGE.encode()

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.creator = creator_of(fs, caller.pid) if self.writing else ""

    def request(self, text: str) -> None:
        tree = self.fs.engine.tree
        name, opts = tree.parse_create(text)
        setup, extra = None, ""
        if "model" in opts:
            if tree.models is None:
                raise NamespaceError(errno.EOPNOTSUPP, "this mount makes no behaviour models")
            # model=PATH: read, appraised and checked before anything is made; loaded
            # into the new namespace's model before its creation is recorded
            mf = None if opts["model"] == "learn" else self._model_file(opts["model"])
            setup, extra = tree.models.creation(mf)
        child = tree.create_bound(self.ns, name, opts, self.pid, self.uid,
                                  check=self._check_opener, bind=self._bind_opener,
                                  setup=setup, extra=extra, creator=self.creator)
        self.moved = True
        log.info("namespace %s (id %d) created; pid %d moved into it (bound by its %s)",
                 child.path, child.id, self.pid, getattr(self, "bound_by", "binder"))

    def _model_file(self, path: str):
        """The model file at ``path`` inside the mount, appraised as a policy file in
        the creator's chain (the new namespace's own policy is empty), and fit for
        this mount."""
        try:
            mf = read_model_file(self.fs, self.ns, Subject(self.pid, self.uid, self.gid),
                                 path)
            self.fs.engine.tree.models.check(mf)
        except SecurityfsError as e:
            raise NamespaceError(e.errno, f"model={path}: {e}") from None
        except ValueError as e:
            raise NamespaceError(errno.EINVAL, f"model={path}: {e}") from None
        return mf


def creator_of(fs, pid: int) -> str:
    """Who an ``ns-create`` by ``pid`` counts against (namespaces.py,
    MAX_ROOT_CHILDREN_PER_CREATOR), read at open as every privilege: "" for a process
    with CAP_SYS_ADMIN in the initial user namespace (the host, no bound but the
    mount's); else the container it is in -- the pid namespace just below the daemon's
    (all of the daemon's pid namespace's such processes count together)."""
    try:
        if fs.creds_of(pid).admin:
            return ""
    except OSError:
        pass
    key = top_key(pid)
    if key is None:
        return "an unknown pid namespace"
    if key == own_key():
        return "the host's pid namespace (without CAP_SYS_ADMIN)"
    return f"pid namespace {key[1]}"


class NsJoin(NsFile):
    """``ns-join``: move the opener into an existing descendant of its namespace (only
    deeper; NamespaceTree.ns_join records it first). The opener alone moves (its
    cgroup): its pid namespace may hold processes that stay where they are."""

    WHOLE_PIDNS = False

    def request(self, text: str) -> None:
        target = self.fs.engine.tree.ns_join(self.ns, text, self.pid, self.uid,
                                             check=self._check_opener,
                                             bind=self._bind_opener)
        self.moved = True
        log.info("pid %d joined namespace %s (id %d) from %s", self.pid, target.path,
                 target.id, self.ns.path)


class NsRemove(NsFile):
    """``ns-remove``: a child of the writer's namespace, once no process is in it."""

    def request(self, text: str) -> None:
        ns = self.fs.engine.tree.ns_remove(self.ns, text, self.pid, self.uid)
        log.info("namespace %s (id %d) removed by pid %d", ns.path, ns.id, self.pid)
