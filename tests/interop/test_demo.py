"""./scripts/demo end to end: it passes with every step's heading, and a step broken on
purpose (IMAFS_DEMO_BREAK) makes it exit 1 naming that step, unmounted and cleaned up."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers.mounts import REPO, is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.interop]

HEADINGS = [
    "1. A small rootfs (busybox)",
    "2. A signing key, and every executable signed (security.ima v2)",
    "3. Mounted through imafs: measure what root executes or reads, appraise executables",
    "4. A container: new pid namespace, chroot into the mount, its own integrity namespace",
    "5. The container's measurement list (read by the host under namespaces/web/)",
    "6. The host's list: the container's creation is an ima-buf entry (ns-create)",
    "7. evmctl and imafs verify-log replay the lists against their PCRs",
    "8. keylime's checker accepts both lists against runtime policies",
    "9. A binary changed behind the mount is refused, and the verifiers see the attempt",
    "10. Unmount",
]


def demo(brk: str | None = None):
    env = dict(os.environ)
    env.pop("IMAFS_DEMO_BREAK", None)
    if brk is not None:
        env["IMAFS_DEMO_BREAK"] = brk
    r = subprocess.run([str(REPO / "scripts/demo")], capture_output=True, text=True,
                       timeout=300, env=env, cwd="/")
    m = re.search(r"files in (/tmp/imafs-demo\.[A-Za-z0-9]+)/rootfs", r.stdout)
    work = m.group(1) if m else None
    if work and is_mounted(f"{work}/mnt"):            # never leave a mount behind
        subprocess.run(["umount", "-l", f"{work}/mnt"], capture_output=True)
        pytest.fail(f"the demo left {work}/mnt mounted\n{r.stdout}\n{r.stderr}")
    return r, work


def headings(out: str) -> list[str]:
    return re.findall(r"^== (.*) ==$", out, re.M)


def test_demo_passes_every_step():
    r, work = demo()
    assert r.returncode == 0, r.stdout + r.stderr
    assert headings(r.stdout) == HEADINGS
    assert "FAILED (step" not in r.stdout + r.stderr
    out = r.stdout
    for expected in ("ok: evmctl ima_verify accepts imafs's signatures of 3 files",
                     "ok: namespace web created, its own policy loaded exactly, its commands ran",
                     "[container] hello from a signed script",
                     "ok: ns-create recorded, with the same data as the container's ns-init",
                     "2 signatures verified; sha1 PCR 10 match; sha256 PCR 10 match",
                     "tied to the host list's ns-create",
                     "ok: keylime: both lists and their PCR 10 verified",
                     "ok: refused (exit 126, Permission denied)",
                     "ok: the attempt is in the host list: verify-log and keylime both name "
                     "/usr/bin/tampered",
                     "ok: demo complete"):
        assert expected in out, expected
    # keylime's policies come from documented commands only
    assert "$ imafs keylime-policy --rootfs rootfs --mount mnt --keys keys" in out
    assert "$ imafs keylime-policy --rootfs rootfs --mount mnt --ns web --keys keys" in out
    assert work is not None and not os.path.exists(work)


@pytest.mark.parametrize("brk,step,why", [
    ("policy", 4, "cannot load my policy"),
    ("unsigned", 4, "/usr/bin/hello did not run"),
    ("keylime", 8, "keylime rejected the host list"),
    ("tamper", 9, "the tampered binary was not refused"),
])
def test_demo_fails_naming_the_step(brk, step, why):
    r, work = demo(brk)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(rf"^FAILED \(step {step}\): .*{re.escape(why)}", r.stderr, re.M), r.stderr
    assert headings(r.stdout) == HEADINGS[:step]        # it stopped at that step
    assert "demo complete" not in r.stdout
    assert work is not None and not os.path.exists(work)   # unmounted and removed


def test_demo_refuses_an_unknown_break():
    r, _ = demo("nonsense")
    assert r.returncode == 2 and "IMAFS_DEMO_BREAK=nonsense" in r.stderr
