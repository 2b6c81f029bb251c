"""Native code for the tests of code loaded through the mount (not tests): a tiny
shared object and program that leave a mark when they run, a library whose mark says
which of its bytes ran, and ``mapper``, a static program that writes a file through
the mount and keeps it open with a shared writable mapping (the attack of issue 14
item 1); a signed rootfs that runs them (``make_rootfs``). Compiled with gcc once per
test session (``build``). The fixtures ``code`` (built once per test module; the
module skipped without a compiler) and ``keydir`` (the rootfs's signing key), for a
test module to import by name."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imafs.cli import main

LOADER = "/lib64/ld-linux-x86-64.so.2"

# a shared object whose constructor writes MARKTEXT to the file $MARK
_LIB = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static const char text[] = MARKTEXT;
__attribute__((constructor)) static void mark(void) {
    const char *p = getenv("MARK");
    if (!p) return;
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd >= 0) { write(fd, text, strlen(text)); close(fd); }
}
"""

_PROG = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    const char *p = getenv("MARK");
    if (p) {
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd >= 0) { write(fd, "unsigned program ran\n", 21); close(fd); }
    }
    return 0;
}
"""

# mapper FILE SRC MODE [closefd]
#   MODE flip:   FILE = "XXXX" + SRC[4:] (created O_RDWR), mapped shared, then the
#                mapping's first 4 bytes become "\x7fELF"
#   MODE keep:   FILE = "XXXX" + SRC[4:], mapped shared, left as it is
#   MODE patch=OLD=NEW: FILE (existing) opened O_RDWR, mapped shared, the first OLD
#                in it replaced by NEW (same length) in the mapping only
# then "ready" on stdout, and it sleeps until its stdin closes (closefd: the
# descriptor is closed first, the mapping alone keeps the file open)
_MAPPER = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
static void die(const char *w) { perror(w); exit(1); }
int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage\n"); return 2; }
    int fd;
    size_t size;
    if (strncmp(argv[3], "patch=", 6) == 0) {
        fd = open(argv[1], O_RDWR);
        if (fd < 0) die("open");
        struct stat st; fstat(fd, &st); size = st.st_size;
    } else {
        int s = open(argv[2], O_RDONLY);
        if (s < 0) die("open src");
        struct stat st; fstat(s, &st); size = st.st_size;
        char *buf = malloc(size);
        if (read(s, buf, size) != (ssize_t)size) die("read src");
        close(s);
        memcpy(buf, "XXXX", 4);
        fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0755);
        if (fd < 0) die("open");
        if (write(fd, buf, size) != (ssize_t)size) die("write");
    }
    char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap");
    if (argc > 4 && strcmp(argv[4], "closefd") == 0) close(fd);
    if (strcmp(argv[3], "flip") == 0) {
        memcpy(m, "\x7f" "ELF", 4);
    } else if (strncmp(argv[3], "patch=", 6) == 0) {
        char *old = argv[3] + 6, *new = strchr(old, '=');
        if (!new) return 2;
        *new++ = 0;
        char *at = memmem(m, size, old, strlen(old));
        if (!at || strlen(new) != strlen(old)) { fprintf(stderr, "not found\n"); return 3; }
        memcpy(at, new, strlen(new));
    }
    printf("ready\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
"""


def build(out: Path) -> dict[str, Path]:
    """Compile the code into ``out``: evil.so (an unsigned library), genuine.so (a
    library whose mark is "genuine library ran"), prog (an unsigned program), mapper
    (static). Raises RuntimeError without gcc."""
    if not shutil.which("gcc"):
        raise RuntimeError("gcc is needed")
    out.mkdir(parents=True, exist_ok=True)
    src = {"lib.c": _LIB, "prog.c": _PROG, "mapper.c": _MAPPER}
    for name, text in src.items():
        (out / name).write_text(text)
    cmds = [
        ["gcc", "-shared", "-fPIC", "-O1", '-DMARKTEXT="unsigned code ran\\n"',
         "-o", "evil.so", "lib.c"],
        ["gcc", "-shared", "-fPIC", "-O1", '-DMARKTEXT="genuine library ran\\n"',
         "-o", "genuine.so", "lib.c"],
        ["gcc", "-O1", "-o", "prog", "prog.c"],
        ["gcc", "-O1", "-static", "-o", "mapper", "mapper.c"],
    ]
    for c in cmds:
        r = subprocess.run(c, cwd=out, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(c)}: {r.stderr}")
    return {n: out / n for n in ("evil.so", "genuine.so", "prog", "mapper")}


def make_rootfs(root: Path, code: dict[str, Path], keydir: Path) -> None:
    """A rootfs for chroot and for programs run from the mount: /bin/true (dynamic),
    its loader and libc, /bin/busybox, /bin/mapper, /lib/genuine.so (owned by uid
    1000, who may write it), all signed with the key in ``keydir``; /tmp (1777) and
    /src unsigned: /src/evil.x and /src/prog.x are evil.so and prog with their first
    four bytes "XXXX", readable under any policy (not ELF)."""
    (root / "bin").mkdir(parents=True)
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    shutil.copy("/usr/bin/true", root / "bin/true")
    real_ld = os.path.realpath(LOADER)
    ld = root / "lib/x86_64-linux-gnu" / os.path.basename(real_ld)
    shutil.copy(real_ld, ld)
    os.symlink("../lib/x86_64-linux-gnu/" + os.path.basename(real_ld), root / LOADER[1:])
    shutil.copy(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"),
                root / "lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    shutil.copy(code["mapper"], root / "bin/mapper")
    shutil.copy(code["genuine.so"], root / "lib/genuine.so")
    key = str(keydir / "signing_key.pem")
    assert main(["sign", "-q", "-r", "--skip-special", "--key", key,
                 str(root / "bin"), str(root / "lib")]) == 0
    os.chown(root / "lib/genuine.so", 1000, 1000)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "src").mkdir()
    for name, path in (("evil.x", code["evil.so"]), ("prog.x", code["prog"])):
        (root / "src" / name).write_bytes(b"XXXX" + path.read_bytes()[4:])
    # hash labels: readable under a FILE_CHECK hash rule too
    assert main(["sign", "-q", "--hash-only", str(root / "src/evil.x"),
                 str(root / "src/prog.x")]) == 0
    os.chmod(root, 0o755)


class Mapper:
    """``mapper`` running (a context manager): it holds FILE open with a shared
    writable mapping until the block ends."""

    def __init__(self, argv: list[str], *, preexec_fn=None):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        line = self.p.stdout.readline()
        if line != b"ready\n":
            self.p.stdin.close()
            err = self.p.stderr.read().decode(errors="replace")
            self.p.wait(10)
            raise RuntimeError(f"mapper {argv}: {line!r} {err}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.p.stdin.close()
        self.p.wait(30)
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    try:
        return build(tmp_path_factory.mktemp("code"))
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys") / "k"
    assert main(["keygen", "--out", str(d), "--cn", "loadable"]) == 0
    return d
