"""The audit log: one JSON object per line, appended and flushed per record.

The kernel sends IMA audit records (``type=INTEGRITY_RULE``, ``INTEGRITY_DATA``,
``INTEGRITY_PCR``, ...) to the audit subsystem; imafs writes the same facts as JSON
lines to ``STATE/audit.log`` (``--audit-log``): the ``audit`` policy action (one
record per file version), appraisal failures, violations, policy and key changes.
Every record has ``time``, ``type`` and ``ns``; the rest depends on the type.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger("imafs.audit")


class AuditLog:
    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._fd = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def record(self, type_: str, **fields) -> None:
        rec = {"time": round(time.time(), 6), "type": type_}
        rec.update(fields)
        line = json.dumps(rec, sort_keys=False, default=_jsonable, ensure_ascii=True) + "\n"
        log.debug("audit: %s", line.rstrip())
        if self._fd is None:
            return
        with self._lock:
            try:
                os.write(self._fd, line.encode())
            except OSError as e:
                log.error("cannot write audit record: %s", e)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _jsonable(v):
    if isinstance(v, bytes):
        return os.fsdecode(v)
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)
