"""Behaviour models of a mount's namespaces: made when a namespace is (``model=`` of
ns-create), and kept across mounts once sealed.

A namespace's model starts learning. Whenever its mode moves or it loads a model
file (``control``: seal, enforce, load), :meth:`ModelStore.save` writes it to the
store's ``models`` database (key: the namespace id, big-endian u32; value: the mode,
a newline, then the model file of its in-model coefficients and pseudonyms, as
``export`` gives it). At the next mount the namespace gets that model back in that
mode; its forensic coefficients, trajectory and forensics records, tasks and the
files created inside it are not kept (a model loaded from a file has none either). A
learning model is not stored: after a remount it learns from the start. A stored
model that no longer fits -- another aggregate (the TPM's PCRs changed), a damaged
record -- comes back enforcing and empty, refusing every event: fail closed.

The aggregate of every model of a mount is the boot aggregate of its root list (its
first entry; the TPM's with --tpm): :func:`aggregate_of`.
"""
from __future__ import annotations

import hashlib
import logging
import struct
from typing import Callable

from imafs.ima import model as M
from imafs.ima.modelfile import ModelFileError, format_model, parse_model
from imafs.ima.modelmap import ZERO
from imafs.ima.modeltask import alive

log = logging.getLogger("imafs.model")

DB = "models"


def aggregate_of(mlist) -> bytes:
    """The models' aggregate: the digest of the root list's boot_aggregate entry when
    it is sha256, else the sha256 of that digest; zero when the list has none."""
    try:
        first = mlist.entry(0) if mlist.count else None
        fd = first.file_digest if first is not None and first.name == b"boot_aggregate" \
            else None
    except Exception:  # noqa: BLE001 - no list (tests), an unreadable entry
        fd = None
    if fd is None:
        return ZERO
    _kind, algo, digest = fd
    if algo == "sha256" and len(digest) == 32:
        return bytes(digest)
    return hashlib.sha256(bytes(digest)).digest()


class ModelStore:
    """The models of one mount (``store``: its LMDB, None for memory only)."""

    def __init__(self, store=None, aggregate: bytes = ZERO):
        self.store = store
        self.aggregate = aggregate

    def new(self) -> M.Model:
        return M.Model(self.aggregate, alive=alive)

    def make(self, nsid: int, option: str | None) -> M.Model | None:
        """A namespace's model: None without ``model=``; the stored one if there is
        one, else a new learning model."""
        if not option:
            return None
        model = self.new()
        raw = self._get(nsid)
        if raw is None:
            return model
        try:
            mode, _, text = raw.partition(b"\n")
            mode = mode.decode("ascii")
            if mode not in M.MODES:
                raise ValueError(f"unknown mode {mode!r}")
            model.load(parse_model(text))
            model.set_mode(mode)
        except (ValueError, ModelFileError) as e:
            log.error("namespace id %d: its stored behaviour model cannot be used (%s): "
                      "it enforces an empty model, refusing every event", nsid, e)
            model = self.new()
            model.enforce()
        return model

    def check(self, mf) -> None:
        """A model file a new namespace is to start from: ValueError when it was not
        learned on this platform (another aggregate)."""
        if mf.aggregate != self.aggregate:
            raise ValueError(f"the model's aggregate {mf.aggregate.hex()} is not this "
                             f"mount's {self.aggregate.hex()}")

    def creation(self, mf) -> tuple[Callable, str]:
        """What making a namespace with a model adds (NamespaceTree.create_bound):
        ``setup(child)``, which loads the model file ``mf`` (None: a learning model)
        into the child's model and stores it, before anything is recorded or anyone
        moves in; and the data its ns-create entry records: ``model=learn`` or
        ``model=state:HEX`` (the state of the file's coefficients)."""
        def setup(child) -> None:
            if child.model is None:
                raise ValueError("this namespace has no model")
            if mf is not None:
                child.model.load(mf)
                self.save(child.id, child.model)
        extra = "model=learn" if mf is None else f"model=state:{mf.computed_state().hex()}"
        return setup, extra

    def save(self, nsid: int, model: M.Model) -> None:
        """Keep ``model`` (sealed or enforcing, or just loaded) for the next mounts.
        Raises lmdb.Error when it cannot be stored."""
        if self.store is None:
            return
        with model.lock:
            value = model.mode.encode() + b"\n" + format_model(model.export())
        with self.store.env.begin(write=True, db=self.store.db(DB)) as t:
            t.put(struct.pack(">I", nsid), value)

    def _get(self, nsid: int) -> bytes | None:
        if self.store is None:
            return None
        with self.store.env.begin(db=self.store.db(DB)) as t:
            v = t.get(struct.pack(">I", nsid))
            return None if v is None else bytes(v)
