"""The digest-list modes (issue 17): the signed list each backing is measured and
appraised with, the policy, and the wrapper that loads the list through
``digest_list_add`` before the workload. The synthetic tree's list holds the digests of
its files (it is in no package); the rootfs's is ``imafs digest-list from-dpkg`` of
--rootfs, from the .debs and index files scripts/rootfs.sh keeps beside it
(DIR.archive). Both are built and signed once per run, at lists/bench.list."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import ROOTFS, import_imafs

if TYPE_CHECKING:
    from benchlib.run import Bench

LIST = Path("lists") / "bench.list"
_LIST_RULES = ("measure func=DIGEST_LIST_CHECK\n"
               "appraise func=DIGEST_LIST_CHECK appraise_type=imasig\n")
# the tree: every read and exec (as measure-appraise's rules), through the list
TREE_DIGEST_LIST = _LIST_RULES + (
    "measure func=FILE_CHECK mask=MAY_READ digest_cache=content pcr=10\n"
    "measure func=BPRM_CHECK digest_cache=content pcr=10\n"
    "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n"
    "appraise func=BPRM_CHECK digest_cache=content\n")
# the rootfs: executables and libraries (the signature rules of the appraise modes)
ROOTFS_DIGEST_LIST = _LIST_RULES + (
    "measure func=BPRM_CHECK digest_cache=content pcr=10\n"
    "measure func=MMAP_CHECK digest_cache=content pcr=10\n"
    "appraise func=BPRM_CHECK digest_cache=content\n"
    "appraise func=MMAP_CHECK digest_cache=content\n")


def digest_list_setup(bench: "Bench", target: str) -> list[str]:
    """The setup of the digest-list modes: the backing's list (once per run), the
    policy, the certificate that signed the list."""
    dest = bench.backing_of(target) / LIST
    if not dest.exists():
        t0 = time.monotonic()
        tmp = bench.work / f"{target}.list"
        if target == ROOTFS:
            archive = Path(str(bench.args.rootfs) + ".archive")
            if not archive.is_dir():
                raise RuntimeError(f"no {archive} (scripts/rootfs.sh keeps the .debs there)")
            bench.imafs(["digest-list", "from-dpkg", str(bench.args.rootfs), "--debs",
                         str(archive), "-o", str(tmp)])
        else:
            tmp.write_bytes(_tree_list(bench.backing))
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(tmp.read_bytes())
        key = bench.signing_key()
        bench.imafs(["sign", "-q", "--key", str(key / "signing_key.pem"),
                     "--cert", str(key / "signing_cert.der"), str(dest)])
        bench.log(f"bench: digest list of the {target} ready: {dest.stat().st_size:,} bytes "
                  f"in {time.monotonic() - t0:.1f} s")
    p = bench.work / f"policy-digest-list-{target}"
    p.write_text(ROOTFS_DIGEST_LIST if target == ROOTFS else TREE_DIGEST_LIST)
    return ["--policy", str(p), "--key", str(bench.signing_key() / "signing_cert.der")]


def _tree_list(backing: Path) -> bytes:
    """A DIGLIM list of the sha256 of every regular file under ``backing``."""
    import_imafs()
    from imafs.ima import digest_lists as dl
    digests = set()
    for dirpath, _, names in os.walk(backing):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                digests.add(h.digest())
    return dl.DigestList((dl.Block.of("file", "sha256", sorted(digests)),)).to_bytes()


def load_digest_list(bench: "Bench", root: Path) -> list[str]:
    """The digest-list modes' wrapper: the list loaded through digest_list_add unless
    the state has it already (the warm mode's remount), then the workload."""
    ctl = root / bench.control_name
    return ["sh", "-c", 'test -e "$1/digest_lists_loaded/bench.list" || '
            'printf "%s\\n" "$2" > "$1/digest_list_add" || exit 1; shift 2; exec "$@"',
            "load", str(ctl), str(root / LIST)]
