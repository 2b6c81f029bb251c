"""The records of namespace events in the measurement lists: what happened to a
namespace, as an ``ima-buf`` entry whose name is the event and whose data says which
namespace (its path, id and UUID) and what of it.

In the parent's list: ``ns-create``, ``ns-remove``, ``ns-join`` and
``ns-join-failed``; in the child's, ``ns-init`` (the same data as its ``ns-create``,
so a verifier ties the two lists). namespaces.py writes them (:func:`event_data`);
verifylog.py replays them (:func:`parse_event`); keylime.py keeps them out of a
runtime policy (:data:`NS_EVENTS`). Kept apart from namespaces.py so that a reader
of lists needs the format only, not the namespace tree.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imafs.ima.namespaces import Namespace

NS_CREATE, NS_INIT, NS_REMOVE = "ns-create", "ns-init", "ns-remove"
NS_JOIN, NS_JOIN_FAILED = "ns-join", "ns-join-failed"
NS_EVENTS = (NS_CREATE, NS_INIT, NS_REMOVE, NS_JOIN, NS_JOIN_FAILED)


def event_data(event: str, ns: Namespace) -> bytes:
    """The data of a namespace event's ima-buf entry: ``ns-create`` (and its
    ``ns-init``) names the child, its id, UUID and options; ``ns-remove`` adds the
    child's final entry count and PCR 10 (sha256 bank when the list has it)."""
    head = f"{event} name={ns.path} id={ns.id} uuid={getattr(ns, 'uuid', '')}"
    if event in (NS_CREATE, NS_INIT):
        return (f"{head} template={ns.template} hash={ns.hash_algo} "
                f"appraise={ns.appraise_mode}").encode()
    if event == NS_REMOVE:
        final = f" entries={ns.mlist.count}"
        try:
            bank = "sha256" if "sha256" in ns.mlist.banks else ns.mlist.banks[0]
            final += f" pcr10={bank}:{ns.mlist.pcr(bank, 10).hex()}"
        except Exception:  # noqa: BLE001 - a list without PCRs (tests)
            pass
        return (head + final).encode()
    return head.encode()


def parse_event(data: bytes) -> dict[str, str]:
    """The fields of a namespace event's data (``event_data``): {"event": NAME,
    "name": ..., "id": ..., "uuid": ..., ...}; ValueError for data that is not one."""
    try:
        words = data.decode("utf-8").split(" ")
    except UnicodeDecodeError:
        raise ValueError("namespace event data is not UTF-8") from None
    if not words or words[0] not in NS_EVENTS:
        raise ValueError(f"not a namespace event: {data[:40]!r}")
    out = {"event": words[0]}
    for w in words[1:]:
        k, eq, v = w.partition("=")
        if not eq or not k or k in out:
            raise ValueError(f"{words[0]}: malformed field {w[:40]!r}")
        out[k] = v
    for k in ("name", "id", "uuid"):
        if k not in out:
            raise ValueError(f"{words[0]}: no {k}= field")
    if not out["id"].isdigit():
        raise ValueError(f"{words[0]}: id {out['id']!r} is not a number")
    return out
