"""The files of the ``imafs verify --policy`` tests (not a test module), shared by the
command's tests without a mount (tests/unit/commands/test_verify.py: each policy gives
the verdicts listed here) and the test that a mount with each policy says the same
(tests/mount/test_verify.py): the fixture ``kinds`` (one file per kind of
security.ima value), ``verdicts`` and the policies with their verdicts."""
from __future__ import annotations

import pytest

from imafs.cli import main

from helpers.cli import run


@pytest.fixture
def kinds(keydir, tmp_path, capsys):
    """One file per kind of security.ima value (and one without)."""
    d = tmp_path / "kinds"
    d.mkdir()
    key = str(keydir / "signing_key.pem")
    for n in ("v2", "v2-512", "v3", "hash", "hash-512", "none", "bad-v2"):
        (d / n).write_bytes(n.encode() * 1000)
    for argv in (["--key", key, d / "v2", d / "bad-v2"], ["--key", key, "-a", "sha512", d / "v2-512"],
                 ["--verity", "--key", key, d / "v3"], ["--hash-only", d / "hash"],
                 ["--hash-only", "-a", "sha512", d / "hash-512"]):
        assert main(["sign", "-q", *map(str, argv)]) == 0
    with open(d / "bad-v2", "ab") as f:
        f.write(b"!")
    capsys.readouterr()
    return d


def verdicts(capsys, keydir, kinds, *opts):
    """``imafs verify -q --keys KEYDIR OPTS`` over every file of ``kinds``: (exit
    status, {file name: verdict}, stderr)."""
    rc, out, err = run(capsys, "verify", "-q", "--keys", keydir, *opts,
                       *sorted(kinds.iterdir()))
    got = {}
    for line in out.splitlines():
        path, _, v = line.partition(": ")
        got[path.rsplit("/", 1)[1]] = v
    return rc, got, err


def policy_file(tmp_path, text):
    """``text`` in a policy file of its own under tmp_path."""
    p = tmp_path / f"policy{abs(hash(text))}"
    p.write_text(text)
    return p


PASS_ALL = {"v2": "pass", "v2-512": "pass", "v3": "pass", "hash": "pass", "hash-512": "pass"}


# each policy, and the verdict verify --policy (and a mount) gives each file of kinds
POLICY_VERDICTS = [
    # appraise_type=imasig without digest_type: a v3 signature is refused, as the mount does
    ("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig",
     {"v2": "pass", "v2-512": "pass", "v3": "fail (IMA-signature-required)",
      "hash": "fail (IMA-signature-required)", "hash-512": "fail (IMA-signature-required)",
      "none": "fail (IMA-signature-required)", "bad-v2": "fail (invalid-signature)"}),
    # a plain appraise rule: v3 is checked over the file digest, and fails
    ("appraise func=FILE_CHECK",
     {**PASS_ALL, "v3": "fail (invalid-verity-signature)", "none": "fail (missing-hash)",
      "bad-v2": "fail (invalid-signature)"}),
    ("appraise func=FILE_CHECK digest_type=verity appraise_type=sigv3",
     {"v2": "fail (verity-signature-required)", "v2-512": "fail (verity-signature-required)",
      "v3": "pass", "hash": "fail (verity-signature-required)",
      "hash-512": "fail (verity-signature-required)",
      "none": "fail (verity-signature-required)", "bad-v2": "fail (verity-signature-required)"}),
    ("appraise func=FILE_CHECK appraise_algos=sha512",
     {"v2": "fail (denied-hash-algorithm)", "v2-512": "pass",
      "v3": "fail (invalid-verity-signature)", "hash": "fail (denied-hash-algorithm)",
      "hash-512": "pass", "none": "fail (missing-hash)", "bad-v2": "fail (invalid-signature)"}),
    # digest_type=verity from a measure rule is OR-ed into the decision (kernel, engine)
    ("measure func=FILE_CHECK digest_type=verity template=ima-ngv2\n"
     "appraise func=FILE_CHECK appraise_type=imasig",
     {"v2": "fail (verity-signature-required)", "v2-512": "fail (verity-signature-required)",
      "v3": "pass", "hash": "fail (verity-signature-required)",
      "hash-512": "fail (verity-signature-required)",
      "none": "fail (verity-signature-required)", "bad-v2": "fail (verity-signature-required)"}),
    # rules for other hooks, masks or owners: not appraised, allowed
    ("appraise func=BPRM_CHECK appraise_type=imasig\nappraise func=FILE_CHECK mask=MAY_WRITE\n"
     "appraise fowner=1000", {n: "not appraised" for n in (*PASS_ALL, "none", "bad-v2")}),
]


# ---------------------------------------------------------- digest lists (--digest-list)

#: a list is loaded only signed (DIGEST_LIST_CHECK appraised), and a read passes by it
LIST_POLICY = ("measure func=DIGEST_LIST_CHECK\n"
               "appraise func=DIGEST_LIST_CHECK appraise_type=imasig\n"
               "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n")
#: a list is loaded unappraised (measured only): it vouches for no appraisal
UNAPPRAISED_LIST_POLICY = ("measure func=DIGEST_LIST_CHECK\n"
                           "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n")
#: under LIST_POLICY with lists/t.list: the list first, then security.ima
LISTED_VERDICTS = {"listed-1": "pass", "listed-2": "pass", "signed": "pass",
                   "tampered": "fail (missing-hash)", "unlisted": "fail (missing-hash)"}


@pytest.fixture
def listed(keydir, tmp_path, capsys):
    """A few files (``files/``) and digest lists of some of them (``lists/``):
    t.list (signed) holds listed-1, listed-2 and tampered (changed since), not
    unlisted nor signed (signed with the key instead); unsigned.list holds the same
    and is not signed; bad.list is t.list cut short by one byte (malformed), signed."""
    import hashlib
    from imafs.ima import digest_lists as dl
    root = tmp_path / "listed"
    files, lists = root / "files", root / "lists"
    files.mkdir(parents=True)
    lists.mkdir()
    for n in LISTED_VERDICTS:
        (files / n).write_bytes(n.encode() * 100)
    digests = sorted(hashlib.sha256((files / n).read_bytes()).digest()
                     for n in ("listed-1", "listed-2", "tampered"))
    data = dl.DigestList((dl.Block.of("file", "sha256", digests),)).to_bytes()
    for n, d in (("t.list", data), ("unsigned.list", data), ("bad.list", data[:-1])):
        (lists / n).write_bytes(d)
    with open(files / "tampered", "ab") as f:
        f.write(b"!")
    key = str(keydir / "signing_key.pem")
    for p in (files / "signed", lists / "t.list", lists / "bad.list"):
        assert main(["sign", "-q", "--key", key, str(p)]) == 0
    capsys.readouterr()
    return root
