"""``imafs mount`` / ``imafs umount`` without mounting: what the help says and what
is refused before anything is mounted (the mounts themselves: tests/mount/)."""
from __future__ import annotations

import pytest

from imafs.cli import main
from imafs.ima.keys import CERT_SUFFIXES


def test_keys_help_names_every_suffix_the_keyring_loads(capsys):
    with pytest.raises(SystemExit):
        main(["mount", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for suffix in CERT_SUFFIXES:
        assert f"*{suffix}" in out
    assert {".der", ".pem", ".crt", ".x509", ".cer"} <= set(CERT_SUFFIXES)
