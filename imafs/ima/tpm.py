"""A TPM 2.0 for the root namespace's measurement list (``imafs mount --tpm TCTI``).

The kernel extends every measurement into PCR 10 of the machine's TPM, so a remote
verifier can check the list against a TPM quote.  With ``--tpm`` the root list does
the same into the TPM that TCTI names -- Debian's swtpm on loopback
(``swtpm:host=127.0.0.1,port=2321``), a device (``device:/dev/tpmrm0``), the
simulator (``mssim:...``) or the resource manager (``tabrmd``) -- through
tpm2-pytss (PyPI ``tpm2-pytss``, the ``[tpm]`` extra; it builds against
``libtss2-dev``).

:class:`TPM` is deliberately small: open a TCTI, list the allocated PCR banks,
read PCRs, extend one PCR in every bank in one ``TPM2_PCR_Extend``.  Calls are
serialised (an ESAPI context is not thread-safe); a failed call drops the context
and the next call opens a new one, so a TPM that went away and came back is used
again.  Every failure is a :class:`TPMError`.

How the list uses it: ``MeasurementList.attach_tpm`` (measurelog.py).
"""
from __future__ import annotations

import os
import threading

from imafs.ima import hashing

__all__ = ["TPM", "TPMError", "TPMMismatch", "parse_tcti"]

# PCR banks are named as the lists name them, with the kernel's names ("sm3", whose
# TPM bank is TPM2_ALG_SM3_256, "sm3_256" to tpm2-tools); imafs.ima.hashing holds both.
NUM_PCRS = 24


class TPMError(Exception):
    """The TPM cannot be reached or refused a command."""


class TPMMismatch(TPMError):
    """The TPM's PCRs disagree with the measurement list they should hold."""


def _bank(name: str) -> hashing.HashAlgo:
    """The algorithm of a PCR bank named with its kernel name."""
    a = hashing.HASH_ALGOS.get(name)
    if a is None or a.tpm_alg_id is None:
        raise TPMError(f"unknown PCR bank {name!r}")
    return a


def parse_tcti(text: str) -> tuple[str, str | None]:
    """``NAME[:CONF]`` (the tpm2-tools TCTI syntax) -> (name, conf); ``swtpm`` alone
    means ``swtpm:host=127.0.0.1,port=2321``."""
    text = text.strip()
    if not text:
        raise TPMError("empty TCTI (e.g. swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0)")
    name, sep, conf = text.partition(":")
    if not name or any(c in name for c in " /,="):
        raise TPMError(f"bad TCTI {text!r}: NAME[:CONFIG], e.g. swtpm:host=127.0.0.1,port=2321")
    return name, (conf if sep else None)


class TPM:
    """One TPM 2.0, reached through a TCTI string."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._name, self._conf = parse_tcti(tcti)
        # the TSS logs failed commands on stderr; TPMError carries the reason
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        try:
            import tpm2_pytss  # noqa: F401
        except ImportError as e:
            raise TPMError("--tpm needs tpm2-pytss (pip install 'imafs[tpm]'; it builds "
                           f"against libtss2-dev): {e}") from None
        self._lock = threading.Lock()
        self._ctx = None
        with self._lock:
            self._banks = self._call(self._read_banks)

    # ------------------------------------------------------------------ plumbing
    def _open(self):
        from tpm2_pytss import ESAPI, TCTILdr
        tcti = TCTILdr(self._name, self._conf)
        try:
            return ESAPI(tcti)
        except Exception:
            try:
                tcti.close()
            except Exception:  # noqa: BLE001
                pass
            raise

    def _call(self, fn, *args):
        """fn(ctx, *args) with the lock held; any failure drops the context."""
        try:
            if self._ctx is None:
                self._ctx = self._open()
            return fn(self._ctx, *args)
        except TPMError:
            raise
        except Exception as e:  # TSS2_Exception, OSError from the TCTI, ...
            self._drop()
            raise TPMError(f"TPM {self.tcti}: {e}") from None

    def _drop(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            try:
                ctx.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    @staticmethod
    def _read_banks(ctx) -> tuple[str, ...]:
        from tpm2_pytss import TPM2_CAP
        _, data = ctx.get_capability(TPM2_CAP.PCRS, 0, 1)
        banks = []
        for sel in data.data.assignedPCR:
            a = hashing.TPM_ALGO_BY_ID.get(int(sel.hash))
            if a is not None and any(bytes(sel.pcrSelect)[:sel.sizeofSelect]):
                banks.append(a.name)
        return tuple(banks)

    # ------------------------------------------------------------------ API
    @property
    def banks(self) -> tuple[str, ...]:
        """The allocated PCR banks with at least one PCR (kernel algorithm names)."""
        return self._banks

    def read_many(self, bank: str, indices) -> list[bytes]:
        """PCRs ``indices`` of one bank (a TPM2_PCR_Read returns at most 8 digests,
        and only the ones it has: ask again for the rest)."""
        from tpm2_pytss import TPML_PCR_SELECTION
        tpm_name = _bank(bank).tpm_name
        want = list(indices)
        for i in want:
            if not 0 <= i < NUM_PCRS:
                raise TPMError(f"PCR {i} out of range")
        got: dict[int, bytes] = {}

        def read(ctx):
            todo = [i for i in want if i not in got]
            while todo:
                sel = TPML_PCR_SELECTION.parse(f"{tpm_name}:{','.join(map(str, todo))}")
                _, out_sel, digests = ctx.pcr_read(sel)
                returned = []
                for s in out_sel:
                    mask = bytes(s.pcrSelect)[:s.sizeofSelect]
                    returned += [i for i in range(len(mask) * 8) if mask[i // 8] >> (i % 8) & 1]
                values = [bytes(d) for d in digests]
                if not returned or len(returned) != len(values):
                    raise TPMError(f"TPM {self.tcti}: PCR read of {bank} returned nothing "
                                   "(bank not allocated?)")
                for i, v in zip(returned, values):
                    got[i] = v
                todo = [i for i in want if i not in got]
            return [got[i] for i in want]

        with self._lock:
            return self._call(read)

    def read(self, pcr: int, banks=None) -> dict[str, bytes]:
        """One PCR in ``banks`` (default: every allocated bank)."""
        return {b: self.read_many(b, [pcr])[0] for b in (banks or self._banks)}

    def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        """TPM2_PCR_Extend of one PCR with one digest per bank, in one command (the
        TPM applies all of them or none)."""
        from tpm2_pytss import ESYS_TR, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA
        if not 0 <= pcr < NUM_PCRS:
            raise TPMError(f"PCR {pcr} out of range")
        has = []
        for bank, d in digests.items():
            a = _bank(bank)
            if len(d) != a.digest_size:
                raise TPMError(f"bad {bank} digest for PCR {pcr}")
            has.append(TPMT_HA(hashAlg=a.tpm_alg_id, digest=TPMU_HA(**{a.tpm_name: d})))
        if not has:
            return
        with self._lock:
            self._call(lambda ctx: ctx.pcr_extend(ESYS_TR(pcr), TPML_DIGEST_VALUES(has)))

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return f"TPM({self.tcti!r}, banks={','.join(self._banks)})"
