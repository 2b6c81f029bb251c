"""``imafs verify --policy`` against a real mount of the same files and policy
(the command alone: tests/unit/commands/test_verify.py; the files and policies of
both: tests/helpers/verify_kinds.py)."""
from __future__ import annotations

import pytest

from helpers.cli import keydir  # noqa: F401 (a fixture)
from helpers.verify_kinds import POLICY_VERDICTS, kinds, policy_file, verdicts  # noqa: F401


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
            did = {}
            for n in said:
                q = m.query(f"/{n}")
                hooks = [h["appraisal"] for h in q["namespaces"][0]["hooks"]
                         if "appraisal" in h]
                fails = [a for a in hooks if a["status"] != "pass"]
                verdict = ("not appraised" if not hooks else
                           f"fail ({fails[0]['cause']})" if fails else "pass")
                try:
                    (m.mnt / n).read_bytes()
                    assert not fails, (rule, n, q)
                except PermissionError:
                    assert fails, (rule, n, q)
                    assert [r["cause"] for r in m.audit() if r["type"] == "appraise"
                            and r["path"] == f"/{n}"][-1] == fails[0]["cause"]
                did[n] = verdict
        finally:
            m.stop()
        assert did == said, rule
