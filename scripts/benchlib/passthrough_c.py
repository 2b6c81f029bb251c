"""libfuse's own low-level passthrough example, ``passthrough_ll``: the C limit every
ratio is measured against. It is built at bench time from the source Debian ships in
libfuse3-dev (``/usr/share/doc/libfuse3-dev/examples``, some files possibly gzipped),
with the command its Makefile uses, into the run's work directory: nothing of it is
committed or kept. It runs ``passthrough_ll -f -o source=BACKING,MOUNT_OPTIONS MNT``
with its defaults (multi-threaded, cache=auto, 1 s entry and attribute timeouts) and
the kernel mount options an imafs mount by root has (``MOUNT_OPTIONS``: a rootfs's
``/dev/null`` is a device node, refused EACCES on a FUSE mount without ``dev``)."""
from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
MOUNT_OPTIONS = "default_permissions,allow_other,suid,dev"   # as imafs/fs/daemon.py's
SOURCE = "passthrough_ll.c"
NEEDS = "scripts/lib/setup.sh installs gcc, libfuse3-dev and pkg-config"


def missing() -> str | None:
    """What is missing to build passthrough_ll here, or None."""
    for tool in ("gcc", "pkg-config"):
        if shutil.which(tool) is None:
            return f"no {tool} ({NEEDS})"
    if not any((EXAMPLES / n).is_file() for n in (SOURCE, SOURCE + ".gz")):
        return f"no {EXAMPLES / SOURCE}[.gz] ({NEEDS})"
    if subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode:
        return f"pkg-config knows no fuse3 ({NEEDS})"
    return None


def _pkg_config(flag: str) -> list[str]:
    p = subprocess.run(["pkg-config", "fuse3", flag], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"pkg-config fuse3 {flag}: {p.stderr.strip()}")
    return p.stdout.split()


def build(dest: Path) -> Path:
    """Compile passthrough_ll in dest (the example and the headers it includes are
    copied there first, gunzipped where Debian compressed them); the binary's path.
    RuntimeError with the reason when it cannot be built."""
    problem = missing()
    if problem:
        raise RuntimeError(problem)
    dest.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLES.iterdir():
        if f.name.endswith((".c", ".h")):
            shutil.copyfile(f, dest / f.name)
        elif f.name.endswith((".c.gz", ".h.gz")):
            (dest / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    binary = dest / "passthrough_ll"
    cmd = ["gcc", *_pkg_config("--cflags"), str(dest / SOURCE), "-o", str(binary),
           *_pkg_config("--libs")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"gcc {SOURCE}: {(p.stderr or p.stdout).strip()[-300:]}")
    return binary


def command(binary: Path, backing: Path, mnt: Path) -> list[str]:
    """The daemon's command line: in the foreground, the backing as its source."""
    return [str(binary), "-f", "-o", f"source={backing},{MOUNT_OPTIONS}", str(mnt)]
