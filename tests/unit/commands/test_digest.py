"""``imafs digest`` (in process): flat digests and fs-verity digests as
`fsverity digest` prints them, its refusals and messages."""
from __future__ import annotations

import hashlib
import os

import pytest

from helpers.fsverity_ref import FSVERITY_X


def run_cli(argv, capsysbinary):
    from imafs.cli import main
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsysbinary.readouterr()
    return rc, out.decode(), err.decode()


def test_cli_flat(mkfile, capsysbinary):
    p = mkfile(b"abc")
    rc, out, err = run_cli(["digest", str(p)], capsysbinary)
    assert rc == 0 and err == ""
    assert out == f"sha256:{hashlib.sha256(b'abc').hexdigest()}  {p}\n"
    rc, out, _ = run_cli(["digest", "--algo", "sha1", "--algo", "sha512", str(p), str(p)],
                         capsysbinary)
    assert rc == 0
    assert out.splitlines() == [f"sha1:{hashlib.sha1(b'abc').hexdigest()}  {p}",
                                f"sha512:{hashlib.sha512(b'abc').hexdigest()}  {p}"] * 2
    rc, out, _ = run_cli(["digest", "--compact", str(p)], capsysbinary)
    assert out == hashlib.sha256(b"abc").hexdigest() + "\n"


def test_cli_verity(mkfile, capsysbinary):
    p = mkfile(b"x")
    rc, out, err = run_cli(["digest", "--verity", str(p)], capsysbinary)
    assert (rc, err) == (0, "")
    assert out == f"{FSVERITY_X[()]} {p}\n"
    rc, out, _ = run_cli(["digest", "--verity", "--hash-alg=sha512", "--salt=AB", str(p)],
                         capsysbinary)
    assert out == f"{FSVERITY_X[(('hash_alg', 'sha512'), ('salt', 'ab'))]} {p}\n"
    rc, out, _ = run_cli(["digest", "--verity", "--block-size", "1024", str(p)], capsysbinary)
    assert out == f"{FSVERITY_X[(('block_size', 1024),)]} {p}\n"


def test_cli_errors_continue_and_exit_1(mkfile, tmp_path, capsysbinary):
    good = mkfile(b"abc")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    missing = tmp_path / "missing"
    rc, out, err = run_cli(["digest", "--verity", str(missing), str(tmp_path), str(fifo),
                            str(good)], capsysbinary)
    assert rc == 1
    assert out.count("\n") == 1 and out.endswith(f" {good}\n")
    lines = err.splitlines()
    assert lines == [f"imafs digest: {missing}: No such file or directory",
                     f"imafs digest: {tmp_path}: Is a directory",
                     f"imafs digest: {fifo}: not a regular file"]


@pytest.mark.parametrize("args,msg", [
    (["--verity", "--block-size", "32"], "block size"),
    (["--verity", "--hash-alg", "sha512", "--block-size", "64"], "too small"),
    (["--verity", "--block-size", "3000"], "block size"),
    (["--verity", "--salt", "abc"], "hex"),
    (["--verity", "--salt", "00" * 33], "at most 32"),
    (["--verity", "--hash-alg", "md5"], "sha256, sha512"),
    (["--algo", "nosuch"], "unknown hash algorithm"),
    (["--algo", "streebog512"], "not available"),
    (["--salt", "ab"], "only with --verity"),
    (["--verity", "--algo", "sha1"], "cannot be combined"),
])
def test_cli_usage_errors(args, msg, mkfile, capsysbinary):
    p = mkfile(b"abc")
    rc, out, err = run_cli(["digest", *args, str(p)], capsysbinary)
    assert rc == 2 and out == ""
    assert msg in err


def test_cli_non_utf8_name(tmp_path, capsysbinary):
    name = os.fsdecode(b"caf\xe9")
    p = tmp_path / name
    p.write_bytes(b"abc")
    from imafs.cli import main
    assert main(["digest", str(p)]) == 0
    out = capsysbinary.readouterr().out
    assert out.endswith(b"caf\xe9\n")
