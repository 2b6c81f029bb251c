"""``imafs verify --policy`` against a real mount of the same files and policy
(the command alone: tests/unit/commands/test_verify.py; the files and policies of
both: tests/helpers/verify_kinds.py)."""
from __future__ import annotations

import pytest

from helpers.cli import keydir, run  # noqa: F401 (a fixture)
from helpers.verify_kinds import (LIST_POLICY, LISTED_VERDICTS,  # noqa: F401 (fixtures)
                                  POLICY_VERDICTS, UNAPPRAISED_LIST_POLICY, kinds, listed,
                                  policy_file, verdicts)


@pytest.mark.mount
def test_verify_policy_agrees_with_the_mount(capsys, keydir, kinds, tmp_path, make_mount):
    """For each policy: what a mount with it says of a read by root of each file (its
    query file's appraisal, the open allowed or EACCES, the cause in its audit log) is
    what verify --policy says."""
    for rule, _ in POLICY_VERDICTS:
        pol = policy_file(tmp_path, rule + "\n")
        rc, said, _ = verdicts(capsys, keydir, kinds, "--policy", pol)
        m = make_mount(["--policy", str(pol), "--keys", str(keydir)], backing=kinds)
        try:
            did = {n: mount_says(m, n) for n in said}
        finally:
            m.stop()
        assert did == said, rule


def mount_says(m, n: str) -> str:
    """What mount ``m`` says of a read by root of its file ``n``: its query file's
    appraisal, checked against the open (allowed, or EACCES with that cause in the
    audit log)."""
    q = m.query(f"/{n}")
    hooks = [h["appraisal"] for h in q["namespaces"][0]["hooks"] if "appraisal" in h]
    fails = [a for a in hooks if a["status"] != "pass"]
    try:
        (m.mnt / n).read_bytes()
        assert not fails, (n, q)
    except PermissionError:
        assert fails, (n, q)
        assert [r["cause"] for r in m.audit() if r["type"] == "appraise"
                and r["path"] == f"/{n}"][-1] == fails[0]["cause"]
    return "not appraised" if not hooks else f"fail ({fails[0]['cause']})" if fails else "pass"


@pytest.mark.mount
def test_verify_digest_list_agrees_with_the_mount(capsys, keydir, listed, tmp_path,
                                                  make_mount):
    """A few files and a digest list of some of them: verify --policy --digest-list
    and a mount with the same policy and the list loaded (digest_list_add) give each
    file the same verdict -- the listed ones pass, a changed and an unlisted one fail;
    a list loaded unappraised (no rule appraises DIGEST_LIST_CHECK) vouches for none,
    in both; a list the policy wants signed and is not is refused by both."""
    files, lists = listed / "files", listed / "lists"
    for policy, lst in ((LIST_POLICY, "t.list"), (UNAPPRAISED_LIST_POLICY, "unsigned.list")):
        pol = policy_file(tmp_path, policy)
        rc, said, err = verdicts(capsys, keydir, files, "--policy", pol,
                                 "--digest-list", lists / lst)
        assert rc == 1 and said == (LISTED_VERDICTS if lst == "t.list" else
                                    {**LISTED_VERDICTS, "listed-1": "fail (missing-hash)",
                                     "listed-2": "fail (missing-hash)"}), (said, err)
        m = make_mount(["--policy", str(pol), "--keys", str(keydir)], backing=files)
        try:
            if lst == "t.list":     # the unsigned list: refused by the mount, and offline
                with pytest.raises(PermissionError):
                    m.ctl("digest_list_add").write_text(str(lists / "unsigned.list"))
                rc, out, err = run(capsys, "verify", "--keys", keydir, "--policy", pol,
                                   "--digest-list", lists / "unsigned.list", files / "listed-1")
                assert rc == 2 and out == "" and "(EACCES)" in err
            m.ctl("digest_list_add").write_text(str(lists / lst))
            did = {n: mount_says(m, n) for n in said}
        finally:
            m.stop()
        assert did == said, policy
