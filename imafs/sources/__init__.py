"""Producers of digest lists: reference digests from sources a distribution signs.

Each module reads one kind of source offline and verifies it before any digest is
taken from it (``docs/digest-lists.md``): ``debian`` (Release signature -> Packages ->
.deb -> data.tar members), ``rpm`` (header signature -> RPMTAG_FILEDIGESTS).  A source
that cannot be verified raises :class:`SourceError`, whose message says which file and
why.  md5sums files and MD5 file digests are never a source.
"""
from __future__ import annotations


class SourceError(Exception):
    """A source refused: which one, and why (one line for the user)."""
