"""The control files of a namespace's behaviour model, ``MNT/.imafs/model/`` (and an
ancestor's ``namespaces/NAME/model/``), as sessions of ima/securityfs_read.py's
:class:`Session` (TSEM's securityfs files):

* ``state``, ``measurement`` -- hex; ``trajectory``, ``forensics`` -- JSON lines, one
  per distinct coefficient with its count; ``export`` -- the model file of its
  in-model coefficients (modelfile.py); ``stats`` -- JSON: mode and counters;
* ``events`` -- every event as a JSON line, for an external agent. A read returns the
  lines there are, or waits for some; the wait is the FUSE layer's, on its event loop
  (no thread is held), at most :data:`MAX_WAITING` reads at a time (more: EAGAIN, as
  for an O_NONBLOCK open with nothing to read), and FUSE cannot interrupt a request:
  the waiting read checks every :data:`WAIT_SLICE` seconds whether the process that
  opened the file has a signal pending (not blocked) or has gone, and then answers
  EINTR -- so ``cat events`` ends on ^C or a kill, and no process is left waiting in
  the kernel for a read the daemon never answers;
* ``control`` -- ``seal``, ``enforce``, ``load PATH``, ``pseudonym PATH`` (model.py's
  ``parse_control``); written as ``policy`` is (root only, the refusals logged and
  audited as ``model_rejected``); a model file named by ``load`` (or by ns-create's
  ``model=PATH``) is read as a policy file is: measured and appraised as
  POLICY_CHECK in the namespace's chain, so a ``appraise func=POLICY_CHECK`` rule
  requires it signed.

A namespace without a model has the directory, but its files cannot be opened
(ENOENT).
"""
from __future__ import annotations

import errno
import json
import os
import threading

from imafs.ima.hooks import OpenMode
from imafs.ima.iint import AccessDenied, Subject, settle
from imafs.ima.model import ModelError, apply_control, parse_control
from imafs.ima.modelfile import MAX_MODEL_BYTES, ModelFileError, format_model, parse_model
from imafs.ima.policy import MAY_READ
from imafs.ima.securityfs_read import Session, SecurityfsError, log, quote

MAX_CONTROL_WRITE = 4096
MAX_WAITING = 4             # reads of ``events`` waiting at once, per mount
WAIT_SLICE = 0.25           # seconds between two looks at the waiting reader


def read_model_file(fs, ns, caller, path: str):
    """The model file at ``path`` inside the mount, measured and appraised as
    POLICY_CHECK by ``ns``'s chain (as a policy file by path), parsed: a
    :class:`~imafs.ima.modelfile.ModelFile`. SecurityfsError: EACCES when appraisal
    refuses it, EFBIG over MAX_MODEL_BYTES, EINVAL when it is no model file."""
    eng = fs.engine
    try:
        f = fs.open_file(path)
    except OSError as e:
        raise SecurityfsError(errno.EINVAL, f"{path}: {e.strerror}") from None
    fd, size = f.fd, f.st.st_size
    state = None
    try:
        if size > MAX_MODEL_BYTES:
            raise SecurityfsError(errno.EFBIG, f"{path}: a model file of {size} bytes "
                                               f"(at most {MAX_MODEL_BYTES})")
        with eng.tree.acting_as(caller.pid, ns):
            state = settle(eng.file_open(caller, f, OpenMode(),
                                         funcs=[("POLICY_CHECK", MAY_READ)]))
        data = os.pread(fd, size + 1, 0)
    except AccessDenied as e:
        raise SecurityfsError(e.errno or errno.EACCES, f"{path}: {e}") from None
    except OSError as e:
        raise SecurityfsError(errno.EINVAL, f"{path}: {e.strerror}") from None
    finally:
        if state is not None:
            eng.file_release(state)
        os.close(fd)
    try:
        return parse_model(data)
    except ModelFileError as e:
        raise SecurityfsError(errno.EINVAL, f"{path}: {e}") from None


class ModelSession(Session):
    """A file of the namespace's model (ENOENT when it has none); ``text(model)``
    is what a read gives, taken at open."""

    def __init__(self, fs, node, ns, caller, flags: int):
        if ns.model is None:
            raise SecurityfsError(errno.ENOENT, f"namespace {ns.path} has no behaviour "
                                                f"model (ns-create NAME model=learn)")
        super().__init__(fs, node, ns, caller, flags)

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return b"" if ns.model is None else cls.text(ns.model).encode()

    @staticmethod
    def text(model) -> str:
        return ""


class ModelState(ModelSession):
    @staticmethod
    def text(model) -> str:
        return model.state().hex() + "\n"


class ModelMeasurement(ModelSession):
    @staticmethod
    def text(model) -> str:
        with model.lock:
            return model.measurement.hex() + "\n"


class ModelTrajectory(ModelSession):
    @staticmethod
    def text(model) -> str:
        return "".join(model.trajectory())


class ModelForensics(ModelSession):
    @staticmethod
    def text(model) -> str:
        return "".join(model.forensics())


class ModelExport(ModelSession):
    """``export``: the model as a model file (what ``imafs model export`` writes)."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return b"" if ns.model is None else format_model(ns.model.export())


class ModelStats(ModelSession):
    @staticmethod
    def text(model) -> str:
        st = model.stats()
        st["aggregate"] = model.aggregate.hex()
        return json.dumps(st, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- events

class _Wakers:
    """The ``notify`` of one model's event stream: wakes the reads waiting for lines
    (each waker is called once, then forgotten; cheap while nobody waits)."""

    def __init__(self):
        self.fns: set = set()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        if not self.fns:
            return
        with self.lock:
            fns, self.fns = self.fns, set()
        for fn in fns:
            fn()


_WAKERS_LOCK = threading.Lock()


class ModelEvents(ModelSession):
    """``events``: the stream (model.EventStream) while this file is open. Lines no
    reader takes are dropped and counted (``stats``: ``stream_dropped``); the
    workload never waits. ``waits``: fs/control.py serves reads through
    :meth:`take`, :meth:`wake_on_data` and :meth:`interrupted`, on its event loop."""

    waits = True

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.nonblocking = bool(flags & os.O_NONBLOCK)
        self.stream = ns.model.stream
        self.rest = b""             # the part of a line a read could not take
        self.waker = None
        with _WAKERS_LOCK:
            if not isinstance(self.stream.notify, _Wakers):
                self.stream.notify = _Wakers()
        self.wakers = self.stream.notify
        self.opened = self.reading
        if self.opened:
            self.stream.open()

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> None:
        return None

    @classmethod
    def size(cls, fs, node, ns, uid: int) -> int:
        return 0

    def read(self, off: int, size: int) -> bytes:
        return self.take(size)

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of the lines waiting now (never waits)."""
        out = self.rest
        while len(out) < size:
            lines = self.stream.take(64)
            if not lines:
                break
            out += "".join(lines).encode()
        self.rest = out[size:]
        return out[:size]

    def wake_on_data(self, fn) -> None:
        """Call ``fn()`` (once, from any thread) when a line comes; None: do not."""
        with self.wakers.lock:
            if self.waker is not None:
                self.wakers.fns.discard(self.waker)
            self.waker = fn
            if fn is not None:
                self.wakers.fns.add(fn)

    def interrupted(self) -> bool:
        """Has the process that opened the file a signal pending that it does not
        block, or gone? (FUSE gives no interrupt for a request being answered.)"""
        try:
            with open(f"/proc/{self.pid}/status", "rb", buffering=0) as f:
                raw = f.read(8192)
        except OSError:
            return True
        pending = blocked = 0
        for line in raw.split(b"\n"):
            key, _, val = line.partition(b":")
            if key in (b"SigPnd", b"ShdPnd"):
                pending |= int(val, 16)
            elif key == b"SigBlk":
                blocked = int(val, 16)
        return bool(pending & ~blocked)

    def close(self) -> None:
        self.wake_on_data(None)
        if self.opened:
            self.opened = False
            self.stream.close()


# --------------------------------------------------------------------------- control

class ModelControl(ModelSession):
    """``control``: one or more commands a write, parsed whole before anything
    applies, then applied in order (a command that fails stops the rest, EINVAL, and
    those before it stay applied); a model that moved or loaded is stored for the
    next mounts (modelstore.py)."""

    def refuse(self, err: int, msg: str):
        log.warning("model control write to namespace %s rejected (pid %d): %s",
                    self.ns.path, self.pid, msg)
        self.fs.engine.audit.record("model_rejected", ns=self.ns.path, pid=self.pid,
                                    uid=self.uid, error=msg)
        raise SecurityfsError(err, msg)

    def write(self, buf: bytes) -> int:
        if len(buf) > MAX_CONTROL_WRITE:
            self.refuse(errno.EINVAL, f"over {MAX_CONTROL_WRITE} bytes in one write")
        try:
            commands = parse_control(buf)
        except ModelError as e:
            self.refuse(errno.EINVAL, f"{e}: {quote(buf)}")
        model = self.ns.model
        try:
            apply_control(model, commands, self._read)
        except SecurityfsError as e:
            self.refuse(e.errno, str(e))
        except (ModelError, ModelFileError) as e:
            self.refuse(errno.EINVAL, str(e))
        finally:
            self._store(model)
        words = " ".join(c.word + ("" if c.path is None else " " + os.fsdecode(c.path))
                         for c in commands)
        self.fs.engine.audit.record("model_control", ns=self.ns.path, pid=self.pid,
                                    uid=self.uid, commands=words, mode=model.mode)
        log.info("namespace %s: model %s by pid %d (now %s, state %s)", self.ns.path,
                 words, self.pid, model.mode, model.state().hex())
        return len(buf)

    def _read(self, path: bytes) -> bytes:
        mf = read_model_file(self.fs, self.ns, Subject(self.pid, self.uid, self.gid),
                             os.fsdecode(path))
        return format_model(mf)

    def _store(self, model) -> None:
        store = self.fs.engine.tree.models
        if store is None or (model.mode == "learn" and not model.points):
            return
        try:
            store.save(self.ns.id, model)
        except Exception as e:  # noqa: BLE001 - lmdb.Error: in force, not kept
            log.error("namespace %s: the behaviour model cannot be stored (it is in force "
                      "for this mount only): %s", self.ns.path, e)
