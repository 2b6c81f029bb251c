"""``imafs mount --mmap-check off|mount-programs|all-elf`` (issue 14, "Also"): which
read-only opens of an ELF file stand for a library load -- FUSE shows no mmap, so
the kernel's MMAP_CHECK of a library is approximated at its open. Each setting,
through a mount whose policy appraises MMAP_CHECK and BPRM_CHECK with signatures:

============================================  =======  ==============  =======
                                              all-elf  mount-programs  off
============================================  =======  ==============  =======
host ``cp``/``sha256sum`` of an unsigned .so  refused  read            read
``cat`` of it by a program of the mount       refused  refused         read
``LD_PRELOAD`` of it into a mount program     refused  refused         loaded
the host's loader running an unsigned program refused  runs            runs
exec of an unsigned program                   refused  refused         refused
============================================  =======  ==============  =======
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers.mounts import run_as
from helpers.loadable import LOADER, code, keydir, make_rootfs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.mount

POLICY = ("appraise func=BPRM_CHECK appraise_type=imasig\n"
          "appraise func=MMAP_CHECK appraise_type=imasig\n")


@pytest.fixture
def rootfs(world_tmp, code, keydir):
    root = world_tmp / "rootfs"
    make_rootfs(root, code, keydir)
    shutil.copy(code["evil.so"], root / "lib/unsigned.so")
    shutil.copy(code["prog"], root / "tmp/prog")
    os.chmod(root / "lib/unsigned.so", 0o644)
    return root


def mount(make_mount, world_tmp, keydir, root, setting, start=True):
    p = world_tmp / "policy"
    p.write_text(POLICY)
    args = ["--policy", str(p), "--key", str(keydir / "signing_cert.der")]
    if setting is not None:
        args += ["--mmap-check", setting]
    return make_mount(args, backing=root, start=start)


def chroot_run(m, argv, **env):
    def enter():
        os.chroot(m.mnt)
        os.chdir("/")
    return subprocess.run(argv, env={"PATH": "/bin", **env}, preexec_fn=enter,
                          capture_output=True, timeout=60)


EXPECT = {   # what each access does under each setting
    "all-elf": dict(host_read=False, mount_read=False, preload=False, host_loader=False),
    "mount-programs": dict(host_read=True, mount_read=False, preload=False,
                           host_loader=True),
    "off": dict(host_read=True, mount_read=True, preload=True, host_loader=True),
}


@pytest.mark.parametrize("setting", ["all-elf", "mount-programs", "off", None],
                         ids=["all-elf", "mount-programs", "off", "default"])
def test_each_setting(make_mount, world_tmp, code, keydir, rootfs, setting):
    m = mount(make_mount, world_tmp, keydir, rootfs, setting)
    want = EXPECT[setting or "all-elf"]      # the default is all-elf
    lib = m.mnt / "lib/unsigned.so"
    mark = m.backing / "tmp/mark"
    # host programs (not run from the mount) reading the library
    r = subprocess.run(["cp", str(lib), str(world_tmp / "copy.so")], capture_output=True)
    assert (r.returncode == 0) == want["host_read"], r.stderr
    r = run_as(1000, 1000, ["sha256sum", str(lib)], capture_output=True)
    assert (r.returncode == 0) == want["host_read"], r.stderr
    # a program of the mount reading it (a container chrooted into the mount)
    r = chroot_run(m, ["/bin/busybox", "cat", "/lib/unsigned.so"])
    assert (r.returncode == 0) == want["mount_read"], r.stderr
    # the dynamic loader of a mount program preloading it
    r = run_as(1000, 1000, [str(m.mnt / "bin/true")],
               env={"LD_PRELOAD": str(lib), "MARK": str(m.mnt / "tmp/mark")},
               capture_output=True, text=True)
    assert mark.exists() == want["preload"], r.stderr
    if mark.exists():
        (m.mnt / "tmp/mark").unlink()      # through the mount: its cached entry goes
    # the host's loader running an unsigned program of the mount
    r = run_as(1000, 1000, [LOADER, str(m.mnt / "tmp/prog")],
               env={"MARK": str(m.mnt / "tmp/mark")}, capture_output=True, text=True)
    assert mark.exists() == want["host_loader"], r.stderr
    if mark.exists():
        (m.mnt / "tmp/mark").unlink()      # through the mount: its cached entry goes
    # an exec is BPRM_CHECK whatever the setting
    with pytest.raises(PermissionError):
        run_as(1000, 1000, [str(m.mnt / "tmp/prog")], env={"MARK": str(m.mnt / "tmp/mark")})
    assert not mark.exists()
    # signed programs and their libraries run, from the host and in the chroot
    assert run_as(1000, 1000, [str(m.mnt / "bin/true")]).returncode == 0
    assert chroot_run(m, ["/bin/true"]).returncode == 0


def test_verdicts_follow_the_setting_across_remounts(make_mount, world_tmp, keydir,
                                                     rootfs):
    """A read allowed under ``off`` is not a verdict an ``all-elf`` mount of the same
    state reuses (and the other way round)."""
    m = mount(make_mount, world_tmp, keydir, rootfs, "all-elf")
    lib = m.mnt / "lib/unsigned.so"

    def host_read():
        return subprocess.run(["cat", str(lib)], capture_output=True).returncode == 0
    assert not host_read()
    m.restart(m.args + ["--mmap-check", "off"])
    assert host_read() and host_read()
    m.restart(m.args[:-2])
    assert not host_read()
    m.restart(m.args + ["--mmap-check", "mount-programs"])
    assert host_read()
    assert chroot_run(m, ["/bin/busybox", "cat", "/lib/unsigned.so"]).returncode != 0


def test_an_unknown_setting_is_refused(world_tmp, rootfs):
    from helpers.mounts import IMAFS, REPO
    r = subprocess.run(IMAFS + ["mount", str(rootfs), str(world_tmp), "--mmap-check", "some"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--mmap-check" in r.stderr
