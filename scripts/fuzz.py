#!/usr/bin/env python3
"""Fuzz every imafs parser that takes bytes from outside, and report how many inputs
each one survived.

    .venv/bin/python scripts/fuzz.py [--runs N] [--engine atheris|hypothesis|random]
                                     [--target NAME ...] [--seconds S]

Targets (each takes one byte string):

  policy       parse_policy; what parses prints and parses back to the same rules
  xattr        parse_ima_xattr / needed_algo / describe_xattr / appraise against a keyring
  evm          parse_evm_xattr / describe_evm_xattr / evm_verify_hmac (HMAC key, keyring)
  cert         certificate parsing and keyring checks (DER and PEM)
  ctl-policy   writes to the ``policy`` control file (a securityfs session, no mount),
               loaded at close
  ctl-keys     writes to ``keys``
  ctl-ns       writes to ``ns-create`` and ``ns-remove``
  ctl-query    writes to ``query`` (paths resolved in a small tree with symlinks)
  ctl-digest   writes to ``digest_list_add``, ``digest_list_del`` and ``digest_query``
               (paths resolved in the same tree, which holds a digest list)
  ctl-evm      writes to ``evm`` (the namespace's EVM flags: the kernel's rules)
  list-binary  verify-log on a binary list (template hashes, PCR replay)
  list-ascii   verify-log on an ascii list
  pcrs         PCR-NN: <hex> files given to verify-log --pcrs
  model        parse_model (behaviour model files); what parses prints back to itself
  model-ctl    writes to a model's ``control`` (parse_control, applied to a fresh model)
  digest-list  digest list files (DIGLIM compact blocks, imafs provenance): parse, what
               parses re-serializes to the input, and loads into an LMDB index and out
  rpm-header   RPM headers (imafs/sources/rpm.py: index entries, typed data, file tags)
  packages     Debian Packages indexes and dpkg status files (imafs/sources/debian.py)
  ns-options   the namespace-options grammar (NAME OPTION=VALUE...), from inside the
               mount and from the host; what parses formats back to the same options
  ns-event     namespace event data (ns-create, ns-remove, ... buffer entries)
  ctl-request  control-socket request lines (protocol.decode, check_request) and the
               daemon's operations on them (a namespace tree without binder)
  oci-state    the OCI runtime state a hook reads on stdin

A *bug* is any exception but the target's documented rejection (PolicyError,
XattrError, EvmXattrError, KeyringError, TemplateError, ValueError where the API says
so, SecurityfsError with an errno the control file documents), a rejection without a
message, an input that takes longer than --timeout seconds, or resident memory over
--rss-mb.

Engines: ``atheris`` (coverage-guided libFuzzer, ``pip install atheris``; one process
per target, the default when importable), ``hypothesis`` (random and seed-mutated
inputs, shrinks a failure) and ``random`` (seed mutations only, no dependency).
Exit status 0 when no target failed. tests/unit/test_hostile_input.py runs the same
targets with a few hundred hypothesis inputs each.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# --------------------------------------------------------------------------- seeds


def _seed_entries():
    from imafs.ima.templates import build_entry, buf_entry, violation_entry
    return [
        build_entry("ima-ng", name="/bin/sh", algo="sha256", digest=bytes(range(32)), pcr=10),
        build_entry("ima", name="/etc/passwd", algo="sha1", digest=bytes(20), pcr=10),
        build_entry("ima-sig", name="/a b", algo="sha256", digest=bytes(32), pcr=10,
                    xattr=b"\x03\x02\x04\x01\x02\x03\x04\x00\x02ab"),
        build_entry("ima-ns", name="/x", algo="sha256", digest=bytes(32), pcr=11, ns_id=3),
        buf_entry("ns-create", b"name=/c id=1", algo="sha256"),
        violation_entry("ima-ng", "/v", algo="sha256"),
    ]


def _cert_seeds() -> list[bytes]:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from helpers import testkeys as tk
    c = tk.cert(tk.key("ec"))
    r = tk.cert(tk.key("rsa"), ski=False)
    return [tk.der(c), tk.pem(c), tk.der(r), tk.pem(r) + tk.pem(c),
            b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"]


def _seed_model(sealed: bool) -> bytes:
    import hashlib
    from imafs.ima.modelfile import ModelFile, format_model
    coefs = tuple(sorted(hashlib.sha256(bytes([i])).digest() for i in range(4)))
    mf = ModelFile(bytes(32), b"\x01" * 32, (hashlib.sha256(b"p").digest(),), coefs, None,
                   sealed)
    return format_model(mf._replace(state=mf.computed_state()))


def seeds(target: str) -> list[bytes]:
    if target == "quota":
        return [b"list:100000:64M", b"list:0:-", b"list:12", b"list:5:4K,list:7:1G"]
    if target in ("policy", "ctl-policy"):
        from imafs.ima.policy_parse import BUILTIN_POLICIES
        out = [t.encode() for t in BUILTIN_POLICIES.values()]
        out += [b"measure func=BPRM_CHECK mask=MAY_EXEC uid>1000 fowner<5 pcr=11 "
                b"template=ima-sig\n",
                b"appraise func=FILE_CHECK appraise_type=imasig|modsig "
                b"appraise_algos=sha256,sha512 fsuuid=01234567-89ab-cdef-0123-456789abcdef\n",
                b"dont_measure fsmagic=0x9fa0\naudit func=MMAP_CHECK mask=^MAY_READ\n",
                b"measure digest_type=verity func=BPRM_CHECK obj_type=foo_t\n# c\n\n"]
        return out
    if target == "xattr":
        from imafs.ima import appraise as ap
        return [ap.hash_xattr("sha256", bytes(32)), b"\x01" + bytes(20), b"\x01" + bytes(16),
                b"\x03\x02\x04\x00\x00\x00\x01\x00\x02ab", b"\x06\x03\x04\x00\x00\x00\x01\x00\x01a",
                b"\x05\x02", b"\x04\x11" + bytes(32)]
    if target == "evm":
        return [b"\x02" + bytes(20), b"\x05\x02\x04\x00\x00\x00\x01\x00\x02ab",
                b"\x03\x02\x06\x00\x00\x00\x01\x00\x01a", b"\x05\x02", b"",
                b"\x02" + bytes(32), b"\x04\x04" + bytes(32)]
    if target in ("cert", "ctl-keys"):
        return _cert_seeds() + [b"/keys/k.der\n", b"/nope\n"]
    if target == "ctl-ns":
        return [b"web", b"web template=ima-sig hash=sha512 appraise=log\n",
                b"-x template=nope", b"\xffname", b"m model=learn", b"m model=/nope",
                b"m model=rel"]
    if target == "ctl-evm":
        return [b"2", b"4\n", b"0x80000000", b"01", b"1", b"+6", b"0", b"0x100", b"-1",
                b"99999999999"]
    if target == "ctl-query":
        return [b"/a\n", b"exec /bin/x\n", b"/out/../../etc/passwd", b"/loop\n", b"rel",
                b"/dir\n", b"/a /b\n"]
    if target == "ctl-digest":
        return [b"/lists/l.list\n", b"l.list", b"/a", b"/loop", b"/out/../lists/l.list\n",
                b"sha256:" + hashlib.sha256(b"a file\n").hexdigest().encode(),
                b"sha1:00", b"/lists/l.list\n/lists/l.list\n"]
    if target == "list-binary":
        return [b"".join(e.binary_record("sha1") for e in _seed_entries())]
    if target == "list-ascii":
        return [b"".join(e.ascii_line("sha1") for e in _seed_entries()),
                b"".join(e.ascii_line("sha256") for e in _seed_entries())]
    if target in ("model", "model-ctl"):
        out = [_seed_model(sealed) for sealed in (True, False)]
        if target == "model-ctl":
            out = [b"seal\n", b"enforce\nseal\n", b"pseudonym /var/log/x\n",
                   b"load /m\n", b"load /m\nenforce\n", b"pseudonym rel\n"]
        return out
    if target == "pcrs":
        return [b"".join(f"PCR-{i:02d}: {'00' * 20}\n".encode() for i in range(24))]
    if target == "rpm-header":
        import struct as _s
        def header(entries, store):
            return (b"\x8e\xad\xe8\x01\0\0\0\0" + _s.pack(">II", len(entries), len(store))
                    + b"".join(_s.pack(">IIII", *e) for e in entries) + store)
        store = b"hello\0" + b"/usr/bin/\0" + b"ab" * 32 + b"\0" + b"\0\0\0\x08" + b"\x81\xed"
        return [header([(1000, 6, 0, 1), (1118, 8, 6, 1), (1035, 8, 16, 1), (5011, 4, 84, 1),
                        (1117, 8, 0, 1), (1116, 4, 84, 1), (1030, 3, 88, 1)], store),
                header([], b""), header([(1, 7, 0, 4)], b"abcd")]
    if target == "ns-options":
        return [b"web", b"web template=ima-sig hash=sha512 appraise=log",
                b"c policy=/etc/p keys=/etc/k", b"x quota=3 model=learn", b"-x hash=md6",
                b"a" * 64 + b" appraise=off"]
    if target == "ns-event":
        return [b"ns-create name=/web id=1 uuid=c7bea3a8-888f-438e-94f8-5c4210013991 "
                b"template=ima-ns hash=sha256 appraise=log",
                b"ns-remove name=/web id=1 uuid=u entries=3 pcr10=sha256:" + b"ab" * 32,
                b"ns-join name=/web/db id=2 uuid=u from=/", b"ns-init", b"x=y"]
    if target == "ctl-request":
        return [b'{"v":1,"op":"hello"}', b'{"v":1,"op":"ns-list"}',
                b'{"v":1,"op":"ns-create","name":"web","pid":1,"options":{"appraise":"log"},'
                b'"policy":"measure func=BPRM_CHECK\n","certs":[]}',
                b'{"v":1,"op":"ns-remove","name":"web","uuid":"u"}', b'{"v":2}', b"[]",
                b'{"v":1,"op":"ns-create","fds":["pidfd"]}']
    if target == "oci-state":
        return [b'{"ociVersion":"1.0.2","id":"web","status":"creating","pid":4242,'
                b'"bundle":"/srv/b","annotations":{"org.imafs.profile":"web"}}',
                b'{"ociVersion":"1.0.2","id":"web","status":"stopped","bundle":"/b"}',
                b"{}", b"null", b'{"id":1}']
    if target == "packages":
        return [b"Package: a\nVersion: 1\nArchitecture: all\nSHA256: " + b"a" * 64 +
                b"\nSize: 3\nFilename: pool/a.deb\n\nPackage: b\nStatus: install ok installed\n"
                b"Version: 2\n"]
    if target == "digest-list":
        from imafs.ima import digest_lists as dl
        blocks = [dl.Block.of("file", "sha256", [bytes([i]) * 32 for i in range(3)]),
                  dl.Block.of("parser", "sha1", [bytes(20)], modifiers=dl.MOD_IMMUTABLE),
                  dl.Block.of("metadata", "sha512", [])]
        prov = dl.Provenance("debian", generator="fuzz", archives=({"suite": "bookworm"},),
                             keys=("0123",), packages=(dl.Package("bash", "5.2", 0, archive=0),
                                                       dl.Package("dash", "0.5", 1)))
        return [dl.DigestList(blocks).to_bytes(), dl.DigestList(blocks, prov).to_bytes(),
                dl.DigestList([], dl.Provenance("rpm")).to_bytes(), b""]
    raise KeyError(target)


# --------------------------------------------------------------------------- targets


class Bug(Exception):
    """The input made a parser misbehave."""


def _clear(e: BaseException) -> None:
    """A rejection must say what is wrong."""
    if not str(e).strip():
        raise Bug(f"{type(e).__name__} without a message")


class Targets:
    """The targets, with what they need built once per process (a keyring, a store,
    a control directory over a small tree)."""

    def __init__(self):
        self._tmp = None
        self._ctl = None
        self._keyring = None

    # --- policy
    def policy(self, data: bytes) -> None:
        from imafs.ima.policy import AccessEvent, Policy, PolicyError, format_policy
        from imafs.ima.policy_parse import parse_policy
        try:
            rules = parse_policy(data)
        except PolicyError as e:
            _clear(e)
            if not (e.line >= 1 and e.col >= 1):
                raise Bug(f"PolicyError without a position: {e}")
            return
        text = format_policy(rules)
        again = parse_policy(text)
        if format_policy(again) != text:
            raise Bug("a parsed policy does not print back to itself")
        ev = AccessEvent(func="BPRM_CHECK", mask=1, uid=0, euid=0, gid=0, egid=0, fowner=0,
                         fgroup=0, fsmagic=0xEF53, path="/bin/sh")
        Policy(rules).match(ev)

    # --- namespace storage quotas
    def quota(self, data: bytes) -> None:
        from imafs.ima.quota import Quota, QuotaError
        try:
            q = Quota.parse(data.decode("utf-8", "replace"))
        except QuotaError as e:
            _clear(e)
            return
        if Quota.parse(q.text()).limits != q.limits:
            raise Bug("a parsed quota does not print back to itself")

    # --- security.ima
    def xattr(self, data: bytes) -> None:
        from imafs.ima import appraise as ap
        try:
            v = ap.parse_ima_xattr(data)
            v.describe()
        except ap.XattrError as e:
            _clear(e)
        ap.describe_xattr(data)
        ap.needed_algo(data)
        kr = self.keyring()
        values = [data]
        if len(data) >= 7 and data[0] in (3, 6):
            # the same value naming each key of the keyring: the signature is checked
            values += [data[:3] + k.keyid.to_bytes(4, "big") + data[7:] for k in kr]
        for value in values:
            for require_sig in (False, True):
                r = ap.appraise(value, lambda a: b"\x11" * ap.hash_algo(a).digest_size, kr,
                                require_sig=require_sig, verity_digest=lambda a: b"\x22" * 32,
                                verity_required=value[:1] == b"\x06", file_size=10)
                str(r)

    # --- security.evm
    def evm(self, data: bytes) -> None:
        from imafs.ima import appraise as ap
        from imafs.ima import evm
        try:
            evm.parse_evm_xattr(data).describe()
        except evm.EvmXattrError as e:
            _clear(e)
            if not 0 <= e.offset <= len(data):
                raise Bug(f"offset {e.offset} outside a {len(data)}-byte value")
        evm.describe_evm_xattr(data)
        kr = self.keyring()
        key = evm.HmacKey(bytes(range(32)))
        values = [data]
        if len(data) >= 7 and data[0] in (3, 5):
            values += [data[:3] + k.keyid.to_bytes(4, "big") + data[7:] for k in kr]
        metas = [evm.FileMetadata({"security.ima": b"\x04\x04" + bytes(32)}, 0, 0, 0o100755,
                                  ino=12, generation=3, fs_uuid=bytes(16)),
                 evm.FileMetadata({"security.capability": data[:20]}, 1, 1, 0o104755),
                 evm.FileMetadata({}, 0, 0, 0o100644)]
        for value in values:
            for m in metas:
                r = evm.evm_verify_hmac(value, m, hmac_key=key, keyring=kr)
                if r.status not in ap.STATUSES or (not r.passed and not r.cause):
                    raise Bug(f"result without a status or a cause: {r!r}")
                str(r)

    def keyring(self):
        if self._keyring is None:
            from imafs.ima.keys import Keyring
            self._keyring = Keyring()
            for s in _cert_seeds()[:3:2]:          # an EC and an RSA key
                self._keyring.add(s)
        return self._keyring

    # --- certificates
    def cert(self, data: bytes) -> None:
        from imafs.ima.keys import Keyring, KeyringError, keyid_of, parse_certificate
        try:
            c = parse_certificate(data)
        except KeyringError as e:
            _clear(e)
            return
        try:
            keyid_of(c)
        except (ValueError, KeyringError) as e:
            _clear(e)
        try:
            Keyring().add(data)
        except KeyringError as e:
            _clear(e)

    # --- control files (no mount: securityfs sessions, as the FUSE handlers drive them)
    def control(self):
        if self._ctl is None:
            self._ctl = _Control()
        return self._ctl

    def ctl_policy(self, data: bytes) -> None:
        self.control().write("policy", data)

    def ctl_keys(self, data: bytes) -> None:
        self.control().write("keys", data)

    def ctl_ns(self, data: bytes) -> None:
        # create, then remove by the first word (the name of a child that was created)
        self.control().write("ns-create", data, reset=False)
        words = data[1:].split()
        self.control().write("ns-remove", data[:1] + (words[0] if words else b""))

    def ctl_query(self, data: bytes) -> None:
        self.control().write("query", data)

    def ctl_digest(self, data: bytes) -> None:
        # the first byte picks the file; the list loaded stays for the next inputs
        # until a removal or the reset every 64 inputs
        name = ("digest_list_add", "digest_list_del", "digest_query")[data[0] % 3] \
            if data else "digest_query"
        self.control().write(name, data[1:], reset=False)
        self._digests = getattr(self, "_digests", 0) + 1
        if self._digests % 64 == 0:
            self.control().root.digest_lists.clear()

    def ctl_evm(self, data: bytes) -> None:
        from imafs.ima.evm_secfs import EVM_INIT_MASK, state_text
        ctl = self.control()
        ctl.write("evm", data, reset=False)
        flags = ctl.root.evm.flags
        ctl._reset("evm")
        if flags & ~EVM_INIT_MASK or not flags:
            raise Bug(f"evm: flags 0x{flags:x} after a write")
        if state_text(flags) != str(flags & 0x7FFFFFFF):
            raise Bug(f"evm: reads {state_text(flags)!r} for flags 0x{flags:x}")

    # --- verify-log
    def list_binary(self, data: bytes) -> None:
        self._verify(data, "binary")

    def list_ascii(self, data: bytes) -> None:
        self._verify(data, "ascii")

    def _verify(self, data: bytes, fmt: str) -> None:
        from imafs.ima.verifylog import entries_of, verify
        for bank in ("sha1", "sha256"):
            rep = verify(entries_of(io.BytesIO(data), fmt, bank), bank=bank,
                         keyring=self.keyring(), all_problems=True)
            for p in rep.problems:
                if not str(p).strip():
                    raise Bug("a problem without a description")

    # --- digest lists
    def digest_list(self, data: bytes) -> None:
        from imafs.ima import digest_lists as dl
        try:
            lst = dl.parse(data)
        except dl.DigestListError as e:
            _clear(e)
            if not 0 <= e.offset <= len(data):
                raise Bug(f"offset {e.offset} outside the {len(data)}-byte input")
            return
        # the compact part is canonical (it is the input's tail, byte for byte); the
        # provenance JSON need not be, but what it parses to must survive a round trip
        body = lst.compact_bytes()
        if (body != data[len(data) - len(body):]) or (lst.provenance is None and body != data):
            raise Bug("the parsed blocks are not the input's bytes")
        if dl.parse(lst.to_bytes()) != lst:
            raise Bug("a parsed list does not parse back to itself")
        idx = self.digest_index()
        idx.add("fuzz.list", data, actions=dl.ACTION_MEASURED)
        for _, _, algo, d in lst.digests(dl.COMPACT_FILE):
            if idx.lookup(algo, d) is None:
                raise Bug("a digest of a loaded list is not found")
            break
        idx.remove("fuzz.list")
        if idx.count() != 0 or idx.lists():
            raise Bug("removing the only list left digests behind")

    def rpm_header(self, data: bytes) -> None:
        from imafs.sources import SourceError, rpm
        try:
            h = rpm.parse_header(data, 0, "fuzz")
        except SourceError as e:
            _clear(e)
            return
        try:
            rpm._digests("fuzz", h, data, "0")
        except SourceError as e:
            _clear(e)

    def packages(self, data: bytes) -> None:
        import tempfile
        from imafs.sources import SourceError, debian
        try:
            list(debian._parse_packages(data, "fuzz"))
        except SourceError as e:
            _clear(e)
        with tempfile.TemporaryDirectory(prefix="imafs-fuzz-dpkg-") as root:
            os.makedirs(os.path.join(root, "var/lib/dpkg"))
            with open(os.path.join(root, "var/lib/dpkg/status"), "wb") as f:
                f.write(data)
            try:
                debian.installed_packages(root)
            except SourceError as e:
                _clear(e)

    def digest_index(self):
        if getattr(self, "_dindex", None) is None:
            import tempfile
            from imafs.ima.digest_index import DigestListIndex
            from imafs.store import Store
            self._dtmp = tempfile.TemporaryDirectory(prefix="imafs-fuzz-dl-")
            self._dindex = DigestListIndex(Store(self._dtmp.name, sync=False, map_size=1 << 30), 0)
        return self._dindex

    def pcrs(self, data: bytes) -> None:
        from imafs.ima.verifylog import parse_pcr_file
        try:
            parse_pcr_file(data.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            _clear(e)

    # --- behaviour models
    def model(self, data: bytes) -> None:
        from imafs.ima.modelfile import ModelFileError, format_model, parse_model
        try:
            mf = parse_model(data)
        except ModelFileError as e:
            _clear(e)
            nlines = data.count(b"\n") + 1
            if e.line < 0 or e.line > nlines:
                raise Bug(f"ModelFileError names line {e.line} of a {nlines}-line input")
            return
        if format_model(mf) != data:
            raise Bug("a parsed model file does not print back to itself")

    def model_ctl(self, data: bytes) -> None:
        from imafs.ima.model import Model, ModelError, apply_control, parse_control
        try:
            cmds = parse_control(data)
        except ModelError as e:
            _clear(e)
            return
        try:
            apply_control(Model(), cmds, read_model=lambda path: _seed_model(False))
        except ModelError as e:       # e.g. load after seal
            _clear(e)

    # --- namespaces from the host and the OCI hook
    def ns_options(self, data: bytes) -> None:
        from imafs.ima import nsoptions
        text = data.decode("utf-8", "replace")
        for host in (False, True):
            try:
                name, opts = nsoptions.parse_create(text, host_files=host)
            except nsoptions.OptionError as e:
                _clear(e)
                continue
            again = nsoptions.parse_create(f"{name} {nsoptions.format_options(opts)}",
                                           host_files=host)
            if again != (name, opts):
                raise Bug("parsed options do not format back to themselves")
            if not host and set(opts) & set(nsoptions.HOST_FILE_OPTIONS):
                raise Bug("a host-file option was taken from inside the mount")

    def ns_event(self, data: bytes) -> None:
        from imafs.ima.nsevents import parse_event
        try:
            f = parse_event(data)
        except ValueError as e:
            _clear(e)
            return
        if not f["id"].isdigit() or "name" not in f:
            raise Bug("an event without a numeric id or a name parsed")

    def ctl_request(self, data: bytes) -> None:
        from imafs.ctl import protocol as P
        try:
            op, args = P.check_request(P.decode(data))
        except P.ProtocolError as e:
            _clear(e)
            return
        if getattr(self, "_handlers", None) is None:
            from imafs.assemble import namespace_tree
            from imafs.ctl.server import Handlers
            from imafs.ima.hostns import HostNamespaces
            from imafs.ima.keys import Keyring
            from imafs.ima.measurelog import MeasurementList
            from imafs.store import Store
            self._htmp = tempfile.TemporaryDirectory(prefix="imafs-fuzz-ctl-")
            self._hstore = Store(self._htmp.name, sync=False, map_size=1 << 30)
            tree = namespace_tree(self._hstore, [], keyring=Keyring(self._hstore, 0),
                                  mlist=MeasurementList(self._hstore, 0))
            self._handlers = Handlers(HostNamespaces(tree), {"dev": "0:0"})
        args.pop("fds", None)
        ans = self._handlers(op, args, {}, (os.getpid(), 0))
        if not isinstance(ans, dict) or "ok" not in ans:
            raise Bug(f"{op}: an answer without ok")
        if not ans["ok"] and not str(ans.get("error", "")).strip():
            raise Bug(f"{op}: a refusal without a message")
        host = self._handlers.host
        for child in list(host.tree.root.children):     # keep the state bounded
            host.tree.ns_remove(host.tree.root, child, os.getpid(), 0)

    def oci_state(self, data: bytes) -> None:
        from imafs.ctl.oci import HookError, parse_state
        try:
            st = parse_state(data)
        except HookError as e:
            _clear(e)
            return
        if not st.bundle.startswith("/") or not isinstance(st.pid, int):
            raise Bug("a state without an absolute bundle or an integer pid parsed")


class _Caller:
    pid, uid, gid = os.getpid(), 0, 0


class _Control:
    """The control files (imafs.ima.securityfs) over an engine with a real LMDB store
    (in a temporary directory), no FUSE: each input is written through a session as
    FUSE writes are, and the session is closed as close(2) closes it (flush, release);
    paths written resolve in a small tree through the mount's own path opener."""

    ALLOWED = {
        "policy": {errno.EINVAL, errno.EFBIG},
        "keys": {errno.EINVAL, errno.EFBIG},
        # EOPNOTSUPP: model= on a mount that makes no behaviour models
        "ns-create": {errno.EINVAL, errno.EEXIST, errno.EOPNOTSUPP},
        "ns-remove": {errno.EINVAL, errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY},
        "query": {errno.EINVAL},
        "digest_list_add": {errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.ELOOP,
                            errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG},
        "digest_list_del": {errno.EINVAL, errno.ENOENT, errno.ELOOP, errno.ENOTDIR,
                            errno.ENAMETOOLONG},
        "digest_query": {errno.EINVAL},
        "evm": {errno.EINVAL, errno.EPERM, errno.ENOENT, errno.ERANGE},
    }

    def __init__(self):
        from imafs.assemble import namespace_tree
        from imafs.fs.adapter import open_in_mount
        from imafs.ima.engine import Engine
        from imafs.ima.keys import Keyring
        from imafs.ima.measurelog import MeasurementList
        from imafs.ima.policy import Policy
        from imafs.ima.securityfs import FILES, Securityfs
        from imafs.store import Store
        self.tmp = tempfile.mkdtemp(prefix="imafs-fuzz-")
        import atexit
        import shutil
        atexit.register(shutil.rmtree, self.tmp, True)
        tree_dir = os.path.join(self.tmp, "tree")
        os.makedirs(os.path.join(tree_dir, "bin"))
        os.makedirs(os.path.join(tree_dir, "dir"))
        os.makedirs(os.path.join(tree_dir, "keys"))
        with open(os.path.join(tree_dir, "a"), "w") as f:
            f.write("a file\n")
        with open(os.path.join(tree_dir, "bin", "x"), "wb") as f:
            f.write(b"\x7fELF" + bytes(100))
        with open(os.path.join(tree_dir, "keys", "k.der"), "wb") as f:
            f.write(_cert_seeds()[0])
        from imafs.ima import digest_lists as dl
        os.makedirs(os.path.join(tree_dir, "lists"))
        with open(os.path.join(tree_dir, "lists", "l.list"), "wb") as f:
            f.write(dl.DigestList((dl.Block.of("file", "sha256", [
                hashlib.sha256(b"a file\n").digest()]),)).to_bytes())
        os.symlink("/etc/passwd", os.path.join(tree_dir, "out"))
        os.symlink("loop", os.path.join(tree_dir, "loop"))
        store = Store(os.path.join(self.tmp, "lmdb"), sync=False, map_size=1 << 30)
        # the mount's namespaces (imafs.assemble), without binder, TPM or FUSE
        tree = namespace_tree(store, [], keyring=Keyring(store, 0),
                              mlist=MeasurementList(store, 0))
        self.engine = Engine(tree, store=store)
        self.root = tree.root
        self.rootfd = os.open(tree_dir, os.O_PATH | os.O_DIRECTORY)
        self.secfs = Securityfs(self.engine,
                                open_file=lambda path: open_in_mount(self.rootfd, path),
                                open_as=lambda pid, uid, gid, path:
                                open_in_mount(self.rootfd, path))
        self.nodes = {n.name: n for n in FILES}
        self._Policy = Policy
        self._reset("evm")

    def write(self, name: str, data: bytes, reset: bool = True) -> None:
        from imafs.ima.securityfs import SecurityfsError
        h = self.secfs.open(self.nodes[name], self.root, _Caller(), os.O_WRONLY)
        # the first byte (when there is one) cuts the input into two write() calls
        cut = data[0] % (len(data) + 1) if data else 0
        parts = [data[1:cut], data[cut:]] if data else [b""]
        try:
            try:
                for p in parts:
                    if p or not name.startswith("ns-"):
                        n = h.write(p)
                        if n != len(p):
                            raise Bug(f"{name}: write of {len(p)} bytes returned {n}")
                h.flush()       # close(2): policy and keys are applied here
            except SecurityfsError as e:
                _clear(e)
                if e.errno not in self.ALLOWED[name]:
                    raise Bug(f"{name}: errno {e.errno} ({os.strerror(e.errno)})")
        finally:
            h.close()
            if reset:
                self._reset(name)

    def _reset(self, name: str) -> None:
        """Keep the state bounded: children removed, the root policy emptied."""
        if name == "policy":
            self.root.set_policy(self._Policy([]))
        elif name.startswith("ns-"):
            for child in list(self.root.children):
                self.engine.tree.ns_remove(self.root, child, os.getpid(), 0)
        elif name == "keys":
            for k in list(self.root.keyring):
                self.root.keyring.remove(k.keyid)
        elif name == "evm":
            from imafs.ima.evm_hooks import EvmState
            self.root.evm = EvmState("enforce")


TARGETS = {
    "policy": "policy", "xattr": "xattr", "evm": "evm", "cert": "cert", "ctl-policy": "ctl_policy",
    "ctl-keys": "ctl_keys", "ctl-ns": "ctl_ns", "ctl-query": "ctl_query",
    "ctl-digest": "ctl_digest", "ctl-evm": "ctl_evm",
    "list-binary": "list_binary", "list-ascii": "list_ascii", "pcrs": "pcrs",
    "model": "model", "model-ctl": "model_ctl",
    "digest-list": "digest_list", "rpm-header": "rpm_header", "packages": "packages",
    "ns-options": "ns_options", "ns-event": "ns_event", "ctl-request": "ctl_request",
    "oci-state": "oci_state",
    "quota": "quota",
}


def make_runner(target: str, timeout: float = 10.0):
    """A callable(data) that raises Bug (or the unexpected exception) on a bug."""
    fn = getattr(Targets(), TARGETS[target])

    def run(data: bytes) -> None:
        t = time.monotonic()
        fn(bytes(data))
        dt = time.monotonic() - t
        if dt > timeout:
            raise Bug(f"{target}: one input of {len(data)} bytes took {dt:.1f} s")
    return run


# --------------------------------------------------------------------------- engines


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[pos:pos + rng.randrange(1, 16)]
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 3 and b:
            j = rng.randrange(len(b))
            b[pos:pos] = b[j:j + rng.randrange(1, 64)]
        elif op == 4:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b[pos:] = other[j:]
        elif op == 5:
            b[pos:pos] = rng.choice([b"\n", b" ", b"\0", b"\xff", b"=", b"-----",
                                     b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"0x",
                                     b"4294967296", b"%", b"\\", "é".encode()])
        elif op == 6 and b:
            b = b * rng.randrange(2, 5)
        elif op == 7 and len(b) > 4:
            j = rng.randrange(len(b) - 3)
            b[j:j + 4] = rng.randrange(1 << 32).to_bytes(4, "little")
    return bytes(b[:1 << 20])


def run_random(target: str, runs: int, seconds: float | None, rng_seed: int) -> dict:
    run = make_runner(target)
    rng = random.Random(rng_seed)
    pool = seeds(target)
    n, t0 = 0, time.monotonic()
    for s in pool:
        run(s)
        n += 1
    while n < runs and (seconds is None or time.monotonic() - t0 < seconds):
        data = (mutate(rng, rng.choice(pool), pool) if rng.random() < 0.8
                else rng.randbytes(rng.randrange(0, 300)))
        try:
            run(data)
        except Exception as e:
            raise Bug(f"{target}: {type(e).__name__}: {e} on input {data[:200]!r}") from e
        n += 1
        if rng.random() < 0.01 and len(pool) < 200:
            pool.append(data)
    return {"inputs": n, "seconds": time.monotonic() - t0}


def run_hypothesis(target: str, runs: int, seconds: float | None, rng_seed: int) -> dict:
    from hypothesis import HealthCheck, given, settings, strategies as st
    run = make_runner(target)
    pool = seeds(target)
    count = [0]
    rng = random.Random(rng_seed)

    @settings(max_examples=runs, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=400),
                     st.sampled_from(pool).flatmap(
                         lambda s: st.integers(0, 2**32).map(
                             lambda k: mutate(random.Random(k), s, pool)))))
    def prop(data):
        count[0] += 1
        run(data)

    t0 = time.monotonic()
    for s in pool:
        run(s)
    prop()
    _ = rng
    return {"inputs": count[0] + len(pool), "seconds": time.monotonic() - t0}


def run_atheris_child(target: str, runs: int, seconds: float | None, timeout: float,
                      rss_mb: int) -> int:
    """In a child process: libFuzzer over one target, the seeds as its corpus."""
    import atheris
    with atheris.instrument_imports():
        import imafs.ima.policy, imafs.ima.policy_parse, imafs.ima.appraise, imafs.ima.keys  # noqa: F401
        import imafs.ima.templates, imafs.ima.verifylog, imafs.ima.securityfs  # noqa: F401
        import imafs.ima.keyring_update  # noqa: F401
        import imafs.ima.namespaces  # noqa: F401
    run = make_runner(target, timeout)
    corpus = tempfile.mkdtemp(prefix=f"imafs-corpus-{target}-")
    for i, s in enumerate(seeds(target)):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(s)
    args = [sys.argv[0], f"-runs={runs}", f"-timeout={int(timeout)}", f"-rss_limit_mb={rss_mb}",
            "-max_len=65536", "-print_final_stats=1",
            f"-artifact_prefix={os.environ.get('IMAFS_FUZZ_ARTIFACTS', tempfile.gettempdir())}/",
            corpus]
    if seconds:
        args.insert(1, f"-max_total_time={int(seconds)}")
    atheris.Setup(args, run)
    atheris.Fuzz()
    return 0


def run_atheris(target: str, runs: int, seconds: float | None, timeout: float,
                rss_mb: int) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_atheris", target,
                        "--runs", str(runs), "--timeout", str(timeout), "--rss-mb", str(rss_mb)]
                       + (["--seconds", str(seconds)] if seconds else []),
                       capture_output=True, text=True)
    out = p.stdout + p.stderr
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out) or \
        re.search(r"Done (\d+) runs", out)
    cov = re.search(r"stat::peak_rss_mb:\s*(\d+)", out)
    res = {"inputs": int(m.group(1)) if m else 0, "seconds": time.monotonic() - t0,
           "peak_rss_mb": int(cov.group(1)) if cov else None}
    if p.returncode != 0:
        tail = "\n".join(out.splitlines()[-40:])
        raise Bug(f"{target}: libFuzzer exit {p.returncode}\n{tail}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20000, help="inputs per target (default 20000)")
    ap.add_argument("--seconds", type=float, help="stop each target after this long")
    ap.add_argument("--engine", choices=["atheris", "hypothesis", "random"])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS))
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    ap.add_argument("--rss-mb", type=int, default=2048, help="memory limit (MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_atheris", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import logging
    logging.disable(logging.CRITICAL)     # every rejection logs a line: not here
    if a._atheris:
        return run_atheris_child(a._atheris, a.runs, a.seconds, a.timeout, a.rss_mb)
    engine = a.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if engine != "atheris":
        resource.setrlimit(resource.RLIMIT_AS, (a.rss_mb << 20 << 2, hard))
    total, failed = 0, []
    print(f"engine {engine}, {a.runs} inputs per target")
    for t in a.target or sorted(TARGETS):
        try:
            if engine == "atheris":
                r = run_atheris(t, a.runs, a.seconds, a.timeout, a.rss_mb)
            elif engine == "hypothesis":
                r = run_hypothesis(t, a.runs, a.seconds, a.seed)
            else:
                r = run_random(t, a.runs, a.seconds, a.seed)
        except Exception as e:  # noqa: BLE001 - report every target
            print(f"{t:12} FAILED: {e}")
            failed.append(t)
            continue
        total += r["inputs"]
        rss = r.get("peak_rss_mb")
        rss = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"{t:12} {r['inputs']:>9} inputs  {r['seconds']:7.1f} s  peak RSS {rss} MiB  ok")
    print(f"total: {total} inputs, {len(failed)} target(s) failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
