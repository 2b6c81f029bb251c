"""``scripts/demo``'s keylime step (``IMAFS_DEMO_KEYLIME=1``), on the harness of
``keylime_services.py``:

    python tests/interop/keylime_demo.py --rootfs DIR --mnt MNT --keys KEYS \\
        --policy IMA_POLICY --work DIR

mounts DIR at MNT with ``--tpm`` on a swtpm of its own, attests it with keylime's
services (PASS while ``/usr/bin/hello`` runs through the mount), then appends a line
to DIR/usr/bin/tampered, runs it through the mount and shows the verifier's FAIL.
Exit 0 when PASS then FAIL were seen, 1 otherwise, 2 when the loop cannot run here.
Everything it started is stopped and MNT unmounted, whatever happens.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from keylime_services import KeylimeError, KeylimeLoop, missing


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == real for line in f)


def demo(rootfs: Path, mnt: Path, keys: Path, policy: Path, work: Path,
         tampered: str = "/usr/bin/tampered", rounds: int = 3) -> int:
    """scripts/demo's keylime step: mount ``rootfs`` at ``mnt`` with ``--tpm`` on a
    swtpm, attest it with keylime's services (PASS while ``/usr/bin/hello`` runs),
    then append a line to ``tampered`` behind the mount, run it through the mount and
    show the verifier's FAIL.  Prints what happens; 0 when PASS then FAIL were seen."""
    imafs = [sys.executable, "-m", "imafs"]
    say = lambda msg: print(msg, flush=True)          # noqa: E731
    rel = lambda p: os.path.relpath(p)                 # noqa: E731
    loop = KeylimeLoop(work, quote_interval=1.0, log=say)
    try:
        tcti = loop.start_tpm()
        r = subprocess.run(imafs + ["mount", str(rootfs), str(mnt), "--state",
                                    str(work / "imafs-state"), "--policy", str(policy),
                                    "--keys", str(keys), "--template", "ima-sig",
                                    "--tpm", tcti], capture_output=True, text=True)
        if r.returncode != 0:
            raise KeylimeError(f"imafs mount failed: {r.stderr.strip()}")
        say(f"$ imafs mount {rel(rootfs)} {rel(mnt)} --policy {rel(policy)} --keys "
            f"{rel(keys)} --template ima-sig --tpm {tcti}")
        loop.start_servers()
        loop.start_agent(mnt)
        rp = work / "runtime-policy.json"
        argv = ["keylime-policy", "--rootfs", rel(rootfs), "--mount", rel(mnt),
                "--keys", rel(keys), "--output", rel(rp)]
        r = subprocess.run(imafs + argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise KeylimeError(f"imafs keylime-policy failed: {r.stderr.strip()}")
        say("$ imafs " + " ".join(argv))
        say(f"$ keylime_tenant -c add -t 127.0.0.1 -tp {loop.agent_port} -u {loop.uuid} "
            f"--runtime-policy {rel(rp)}")
        loop.add(rp)
        for _ in range(rounds):
            out = subprocess.run(["chroot", str(mnt), "/usr/bin/hello"], capture_output=True,
                                 text=True).stdout.strip()
            st = loop.wait_pass(1)
            say(f"verifier: {st['attestation_status']} (attestation {st['attestation_count']}"
                f", after /usr/bin/hello ran: {out!r})")
        with open(f"{rootfs}{tampered}", "a") as f:
            f.write('echo "this line was added by an attacker"\n')
        r = subprocess.run(["chroot", str(mnt), tampered], capture_output=True, text=True)
        say(f"a line appended to {rel(rootfs)}{tampered}, which then ran through the "
            f"mount: exit {r.returncode} ({r.stderr.strip()})")
        st, took = loop.wait_fail(timeout=30)
        say(f"verifier: {st['attestation_status']} {took:.1f} s later: {loop.failure(st)}")
        return 0
    except KeylimeError as e:
        say(f"keylime loop: {e}")
        return 1
    finally:
        loop.close()
        if _mounted(mnt):
            subprocess.run(imafs + ["umount", str(mnt)], capture_output=True)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    d = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d.add_argument("--rootfs", type=Path, required=True)
    d.add_argument("--mnt", type=Path, required=True)
    d.add_argument("--keys", type=Path, required=True)
    d.add_argument("--policy", type=Path, required=True, help="the mount's IMA policy")
    d.add_argument("--work", type=Path, required=True)
    a = d.parse_args(argv)
    why = missing()
    if why:
        print(f"keylime loop: cannot run: {why}", file=sys.stderr)
        return 2
    return demo(a.rootfs.resolve(), a.mnt.resolve(), a.keys.resolve(), a.policy.resolve(),
                a.work.resolve())


if __name__ == "__main__":
    sys.exit(main())
