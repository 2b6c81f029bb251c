"""Integrity namespaces through a real mount, with real processes: "containers" are
``unshare --fork --pid --mount-proc`` chrooted into a busybox rootfs on the mount (or
plain shells where the host's tools are needed), each entering its namespace with
``echo NAME > /.imafs/ns-create``."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess

import pytest

from helpers.mounts import wait_for
from helpers.containers import (BUSYBOX, MEASURE_READS, buf_id, cg_key, container, entries,
                                host_sh, keygen, keyid, lines, names, ns_bufs, rootfs, sign)


pytestmark = pytest.mark.mount


APPRAISE_EXEC = "appraise func=BPRM_CHECK appraise_type=imasig\n"


def cg_dirs(m) -> dict[str, int]:
    """The namespace cgroups of the mount's hierarchy and how many processes each has,
    as root of the initial user namespace sees them by mounting the hierarchy in a
    mount namespace of its own (the host's never has it mounted)."""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"""
        d=$(mktemp -d) && mount -t cgroup -o none,name=imafs.{cg_key(m)} cgroup $d || exit 9
        for x in $d/ns*; do [ -d "$x" ] && echo "${{x##*/}} $(wc -w < $x/cgroup.procs)"; done
        umount $d; rmdir $d"""], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return {k: int(v) for k, v in (ln.split() for ln in r.stdout.splitlines())}


@pytest.fixture
def ns_mount(make_mount, world_tmp):
    """make(policy_text, extra_args) -> a mount over a busybox rootfs."""
    n = [0]

    def make(policy: str = "", args=(), prepare=None):
        n[0] += 1
        backing = world_tmp / f"rootfs{n[0]}"
        backing.mkdir()
        rootfs(backing)
        if prepare:
            prepare(backing)
        extra = list(args)
        if policy:
            pf = world_tmp / f"policy{n[0]}"
            pf.write_text(policy)
            extra += ["--policy", str(pf)]
        return make_mount(extra, backing=backing)
    return make


# ------------------------------------------------------------------ tests
def test_two_sibling_containers(ns_mount, world_tmp):
    """Two containers on one mount, different policies and keys, at the same time:
    each sees only its own policy, list and keys, and not its sibling's."""
    k1, k2 = keygen(world_tmp / "k1"), keygen(world_tmp / "k2")

    def prepare(b):
        shutil.copy(k1 / "signing_cert.der", b / "keys" / "k1.der")
        shutil.copy(k2 / "signing_cert.der", b / "keys" / "k2.der")
        (b / "a.txt").write_text("for c1\n")
        (b / "b.txt").write_text("for c2\n")
    m = ns_mount(MEASURE_READS, prepare=prepare)
    assert "NAME" in m.ctl("ns-create").read_text()        # reading it says how to use it

    script = """
    echo {name} > /.imafs/ns-create || exit 9
    printf '{policy}' > /.imafs/policy || exit 8
    cat /keys/{key}.der > /.imafs/keys || exit 7
    echo ready > /tmp/{name}.ready
    while [ ! -e /tmp/{other}.ready ]; do sleep 0.05; done
    cat /{file} > /dev/null
    echo policy=$(cat /.imafs/policy)
    echo keys=$(cat /.imafs/keys)
    echo nslist=$(ls /.imafs/namespaces)
    cat /.imafs/namespaces/{other}/policy && echo sibling=readable || echo sibling=refused
    cat /.imafs/ascii_runtime_measurements > /tmp/{name}.list
    sleep 0.2
    """
    p1 = container(m, script.format(name="c1", other="c2", key="k1", file="a.txt",
                                    policy=r"measure func=FILE_CHECK mask=MAY_READ\n"),
                   wait=False)
    p2 = container(m, script.format(name="c2", other="c1", key="k2", file="b.txt",
                                    policy=r"measure func=BPRM_CHECK\n"), wait=False)
    o1, e1 = p1.communicate(timeout=30)
    o2, e2 = p2.communicate(timeout=30)
    assert (p1.returncode, p2.returncode) == (0, 0), (o1, e1, o2, e2)
    r1 = lines(subprocess.CompletedProcess([], 0, o1, e1))
    r2 = lines(subprocess.CompletedProcess([], 0, o2, e2))
    assert r1["policy"] == "measure func=FILE_CHECK mask=MAY_READ"
    assert r2["policy"] == "measure func=BPRM_CHECK"
    assert r1["keys"].startswith(keyid(k1)) and keyid(k2) not in r1["keys"]
    assert r2["keys"].startswith(keyid(k2)) and keyid(k1) not in r2["keys"]
    assert r1["nslist"] == r2["nslist"] == ""
    assert r1["sibling"] == r2["sibling"] == "refused"

    l1 = names((m.backing / "tmp" / "c1.list").read_bytes())
    l2 = names((m.backing / "tmp" / "c2.list").read_bytes())
    assert b"/a.txt" in l1 and b"/b.txt" not in l1 and b"/bin/busybox" not in l1
    assert b"/bin/busybox" in l2 and b"/a.txt" not in l2 and b"/b.txt" not in l2
    assert l1[:2] == l2[:2] == [b"boot_aggregate", b"ns-init"]
    # the host measured both (its policy applies inside every child) and sees both
    host = m.ctl("ascii_runtime_measurements").read_bytes()
    assert {b"/a.txt", b"/b.txt"} <= set(names(host))
    assert sorted(os.listdir(m.ctl("namespaces"))) == ["c1", "c2"]
    assert m.ctl("namespaces/c1/ascii_runtime_measurements").read_bytes() == \
        (m.backing / "tmp" / "c1.list").read_bytes()
    assert keyid(k2) in m.ctl("namespaces/c2/keys").read_text()
    assert m.ctl("keys").read_text() == ""
    assert m.ctl("policy").read_text().split() == MEASURE_READS.split()
    assert "ns-create" not in os.listdir(m.ctl("namespaces/c1"))  # only in one's own view
    assert "ns-remove" in os.listdir(m.ctl("namespaces/c1"))


def test_daemonized_grandchild_stays(ns_mount):
    """Double fork + setsid: the grandchild is reparented (to the container's init,
    or to the host's) and is still measured in its namespace."""
    def prepare(b):
        (b / "file").write_text("read by the daemon\n")
        (b / "file2").write_text("read by the host-level daemon\n")
    m = ns_mount(MEASURE_READS, ["--template", "ima-ns"], prepare=prepare)
    r = container(m, f"""
    echo d1 > /.imafs/ns-create && printf '{MEASURE_READS}' > /.imafs/policy || exit 9
    setsid sh -c 'sh -c "sleep 1; cat /file > /tmp/out; cat /proc/self/stat > /tmp/stat" &' &
    while [ ! -s /tmp/stat ]; do sleep 0.05; done
    """)
    assert r.returncode == 0, r.stderr
    assert (m.backing / "tmp" / "out").read_text() == "read by the daemon\n"
    stat = (m.backing / "tmp" / "stat").read_text().rsplit(")", 1)[1].split()
    assert stat[1] == "1"                       # reparented to the container's init
    assert b"/file" in names(m.ctl("namespaces/d1/ascii_runtime_measurements").read_bytes())

    # no pid namespace: the daemon outlives its creator and is reparented to the
    # host's init (or a subreaper); its creator is gone when it reads
    mnt = m.mnt
    r = host_sh(f"""
    echo d2 > {mnt}/.imafs/ns-create && printf '{MEASURE_READS}' > {mnt}/.imafs/policy
    setsid sh -c 'sh -c "sleep 0.5; cat {mnt}/file2 > /dev/null; echo \\$PPID > {mnt}/tmp/ppid" &' &
    echo creator=$$
    """, pidns=False)
    assert r.returncode == 0, r.stderr
    creator = lines(r)["creator"]
    assert wait_for(lambda: (m.backing / "tmp" / "ppid").exists(), 10)
    assert wait_for(lambda: (m.backing / "tmp" / "ppid").read_text().strip() != "", 2)
    assert (m.backing / "tmp" / "ppid").read_text().strip() != creator
    d2 = names(m.ctl("namespaces/d2/ascii_runtime_measurements").read_bytes())
    assert b"/file2" in d2 and b"/file" not in d2
    # the host's ima-ns list names the namespace that read each file
    d2_id = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[1])
    by_name = {e.name: e for e in entries(m.ctl("ascii_runtime_measurements"))}
    assert int.from_bytes(by_name[b"/file2"].get("ns"), "little") == d2_id
    d1_id = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[0])
    assert int.from_bytes(by_name[b"/file"].get("ns"), "little") == d1_id != d2_id


def test_host_appraisal_applies_inside_child(ns_mount, world_tmp):
    """A host appraise rule refuses an unsigned exec inside a child, even one created
    with appraise=off and an empty policy; a host-signed binary runs."""
    hk = keygen(world_tmp / "host")

    def prepare(b):
        sign(hk, b / "bin" / "busybox")
        (b / "unsigned").mkdir()
        shutil.copy(BUSYBOX, b / "unsigned" / "echo")
    m = ns_mount(APPRAISE_EXEC, ["--key", str(hk / "signing_cert.der")], prepare=prepare)
    r = container(m, """
    echo weak appraise=off > /.imafs/ns-create || exit 9
    echo policy=$(cat /.imafs/policy)
    /unsigned/echo should-not-run
    echo unsigned=$?
    /bin/echo signed-ran
    echo signed=$?
    """)
    assert r.returncode == 0, r.stderr
    out = lines(r)
    assert out["policy"] == ""
    assert out["unsigned"] == "126" and "should-not-run" not in r.stdout
    assert "signed-ran" in r.stdout and out["signed"] == "0"
    assert "Permission denied" in r.stderr
    assert "/unsigned/echo" in m.log_text()


def test_child_cannot_reach_host_or_sibling(ns_mount):
    m = ns_mount(MEASURE_READS)
    mnt = m.mnt
    r = host_sh(f"echo other > {mnt}/.imafs/ns-create; sleep 0.1")
    assert r.returncode == 0, r.stderr
    host_policy = m.ctl("policy").read_text()
    r = container(m, """
    echo c > /.imafs/ns-create || exit 9
    cat /.imafs/namespaces/other/policy; echo sibling=$?
    ls /.imafs/namespaces/..; echo up=$?
    echo 'measure func=BPRM_CHECK' > /.imafs/namespaces/../policy; echo own=$?
    echo 'measure func=MMAP_CHECK' > /.imafs/namespaces/other/policy; echo wsib=$?
    echo nslist=$(ls /.imafs/namespaces)
    """)
    out = lines(r)
    assert out["sibling"] != "0" and out["wsib"] != "0" and out["nslist"] == ""
    assert out["own"] == "0"          # namespaces/.. is the child's own directory
    assert m.ctl("policy").read_text() == host_policy
    assert m.ctl("namespaces/c/policy").read_text().split() == ["measure", "func=BPRM_CHECK"]
    assert m.ctl("namespaces/other/policy").read_text() == ""

    # non-root inside a child: may not write its policy, keys or ns-create
    r = host_sh(f"""
    echo nr > {mnt}/.imafs/ns-create || exit 9
    setpriv --reuid=1000 --regid=1000 --clear-groups sh -c '
      echo "measure func=BPRM_CHECK" > {mnt}/.imafs/policy; echo policy=$?
      echo /keys/x.der > {mnt}/.imafs/keys; echo keys=$?
      echo sub > {mnt}/.imafs/ns-create; echo create=$?'
    echo "measure func=BPRM_CHECK" > {mnt}/.imafs/policy; echo rootpolicy=$?
    """)
    out = lines(r)
    assert "0" not in (out["policy"], out["keys"], out["create"]), r
    assert r.stderr.count("Permission denied") == 3
    assert out["rootpolicy"] == "0"
    assert "nr" in os.listdir(m.ctl("namespaces"))
    assert os.listdir(m.ctl("namespaces/nr/namespaces")) == []


def test_nested_three_levels(ns_mount):
    def prepare(b):
        for f in ("f1", "f2", "f3"):
            (b / f).write_text(f)
    m = ns_mount("", prepare=prepare)
    pol = MEASURE_READS.replace("\n", r"\n")
    r = container(m, f"""
    echo l1 > /.imafs/ns-create && printf '{pol}' > /.imafs/policy || exit 1
    sh -c '
      echo l2 > /.imafs/ns-create && printf "{pol}" > /.imafs/policy || exit 2
      sh -c "
        echo l3 > /.imafs/ns-create && printf \\"{pol}\\" > /.imafs/policy || exit 3
        cat /f3 > /dev/null
        echo l3ns=\\$(ls /.imafs/namespaces)
        cat /.imafs/ascii_runtime_measurements > /tmp/l3.list" || exit $?
      cat /f2 > /tmp/x2
      echo l2ns=$(ls /.imafs/namespaces)
      cat /.imafs/namespaces/l3/runtime_measurements_count > /tmp/l3.count' || exit $?
    cat /f1 > /tmp/x1
    echo l1ns=$(ls /.imafs/namespaces)
    """)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = lines(r)
    assert (out["l1ns"], out["l2ns"], out["l3ns"]) == ("l2", "l3", "")
    base = "namespaces/l1"
    l1 = names(m.ctl(f"{base}/ascii_runtime_measurements").read_bytes())
    l2 = names(m.ctl(f"{base}/namespaces/l2/ascii_runtime_measurements").read_bytes())
    l3 = names(m.ctl(f"{base}/namespaces/l2/namespaces/l3/ascii_runtime_measurements")
               .read_bytes())
    assert l3 == names((m.backing / "tmp" / "l3.list").read_bytes())
    # an access is measured by its namespace and every ancestor, never a descendant
    assert b"/f3" in l3 and b"/f2" not in l3 and b"/f1" not in l3
    assert {b"/f3", b"/f2"} <= set(l2) and b"/f1" not in l2
    assert {b"/f3", b"/f2", b"/f1"} <= set(l1)
    assert l1.count(b"ns-create") == 1 and l2.count(b"ns-create") == 1
    assert l3.count(b"ns-create") == 0 and l3[1] == b"ns-init"
    assert int((m.backing / "tmp" / "l3.count").read_text()) == len(l3)
    assert b"/f1" not in names(m.ctl("ascii_runtime_measurements").read_bytes())  # no rules
    assert ns_bufs(m.ctl(f"{base}/ascii_runtime_measurements"), b"ns-create")[0] \
        .startswith("ns-create name=/l1/l2 ")


def test_creation_measured_in_parent(ns_mount):
    """ns-create in the parent's list (ima-buf) names the child and its uuid; the
    child's list starts with the same data (ns-init); the host's ima-ns entries name
    the accessing namespace."""
    m = ns_mount(MEASURE_READS, ["--template", "ima-ns"],
                 prepare=lambda b: (b / "x").write_text("x"))
    r = container(m, "echo kid template=ima-sig > /.imafs/ns-create && cat /x > /tmp/y")
    assert r.returncode == 0, r.stderr
    host = entries(m.ctl("ascii_runtime_measurements"))
    create = [e for e in host if e.name == b"ns-create"]
    assert len(create) == 1 and create[0].template == "ima-buf"
    buf = create[0].get("buf")
    assert create[0].get("d-ng") == b"sha256:\0" + hashlib.sha256(buf).digest()
    fields = dict(w.split("=", 1) for w in buf.decode().split()[1:])
    assert fields["name"] == "/kid" and fields["template"] == "ima-sig"
    assert re.fullmatch(r"[0-9a-f-]{36}", fields["uuid"])
    kid = entries(m.ctl("namespaces/kid/ascii_runtime_measurements"))
    assert kid[1].name == b"ns-init" and kid[1].get("buf") == buf
    assert kid[1].template == "ima-buf"
    # the host's ima-ns entry of /x names the child's id
    x = [e for e in host if e.name == b"/x"]
    assert len(x) == 1 and x[0].template == "ima-ns"
    assert int.from_bytes(x[0].get("ns"), "little") == int(fields["id"]) > 0
    # control files read with sendfile (busybox cat) are never stale
    def count():
        return int(subprocess.run([BUSYBOX, "cat", str(m.ctl("runtime_measurements_count"))],
                                  capture_output=True, text=True, check=True).stdout)
    before = count()
    # the host's own accesses: namespace 0
    (m.mnt / "x").read_text()
    (m.backing / "x").write_text("x2")
    (m.mnt / "x").read_text()
    last = [e for e in entries(m.ctl("ascii_runtime_measurements")) if e.name == b"/x"][-1]
    assert int.from_bytes(last.get("ns"), "little") == 0
    assert count() == before + 1


def test_security_ima_per_namespace(ns_mount, world_tmp):
    """setfattr security.ima inside a child stores the child's own attribute; the
    host's is unchanged; each appraises against its own attribute and keyring (the
    child: the host-signed hostonly/busybox, which has no value of the child's, is
    appraised with its own signature against the child's keyring -- unknown key)."""
    hk, ck = keygen(world_tmp / "host"), keygen(world_tmp / "child")

    def prepare(b):
        for name in ("tool", "hostonly"):       # busybox runs the applet named argv[1]
            (b / name).mkdir()
            shutil.copy(BUSYBOX, b / name / "busybox")
            sign(hk, b / name / "busybox")
        shutil.copy(ck / "signing_cert.der", b / "keys" / "child.der")
    m = ns_mount(APPRAISE_EXEC, ["--key", str(hk / "signing_cert.der")], prepare=prepare)
    mnt, b = m.mnt, m.backing
    tool, hostonly = "tool/busybox", "hostonly/busybox"
    host_sig = os.getxattr(b / tool, "security.ima")
    child_sig = sign(ck, b / tool, print_only=True).split(": ")[1].strip()
    r = host_sh(f"""
    echo c > {mnt}/.imafs/ns-create || exit 9
    printf '{APPRAISE_EXEC.strip()}\\n' > {mnt}/.imafs/policy || exit 8
    echo /keys/child.der > {mnt}/.imafs/keys || exit 7
    setfattr -n security.ima -v 0x{child_sig} {mnt}/{tool} || exit 6
    echo seen=$(getfattr --only-values -n security.ima {mnt}/{tool} | od -An -tx1 | tr -d ' \\n')
    {mnt}/{tool} echo tool-ran; echo tool=$?
    {mnt}/{hostonly} echo hostonly-ran; echo hostonly=$?
    """)
    out = lines(r)
    assert out["seen"] == child_sig, r
    assert out["tool"] == "0" and "tool-ran" in r.stdout
    # signed for the host only: the child's own rule refuses it
    assert out["hostonly"] == "126" and "hostonly-ran" not in r.stdout
    nsid = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[0])
    assert os.getxattr(b / tool, "security.ima") == host_sig
    assert os.getxattr(b / tool, f"security.imafs.ns{nsid}.ima").hex() == child_sig
    # the host reads and appraises its own attribute
    assert os.getxattr(mnt / tool, "security.ima") == host_sig
    assert subprocess.run([str(mnt / hostonly), "true"]).returncode == 0
    # nobody reads or writes the private attribute by its name through the mount
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / tool, f"security.imafs.ns{nsid}.ima")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(mnt / tool, f"security.imafs.ns{nsid}.ima", host_sig)
    assert e.value.errno == errno.EPERM
    # a sibling sees none of the child's attribute: the file's own (the host's)
    r = host_sh(f"""echo sib > {mnt}/.imafs/ns-create || exit 9
    echo sib=$(getfattr --only-values -n security.ima {mnt}/{tool} | od -An -tx1 | tr -d ' \\n')""")
    assert lines(r)["sib"] == host_sig.hex(), r


def test_ns_remove_lifecycle(ns_mount):
    m = ns_mount(MEASURE_READS, prepare=lambda b: (b / "f").write_text("f"))
    mnt = m.mnt
    # refusals, each with a reason in the log
    for text, err in (("bad/name", "Invalid argument"), ("ok bogus=1", "Invalid argument")):
        r = host_sh(f"echo '{text}' > {mnt}/.imafs/ns-create", pidns=False)
        assert r.returncode != 0 and err in r.stderr
    p = container(m, "echo c > /.imafs/ns-create && printf '%s' > /.imafs/policy && "
                     "cat /f > /tmp/o && echo sub > /.imafs/ns-create && sleep 30"
                     % MEASURE_READS.replace("\n", r"\n"), wait=False)
    try:
        assert wait_for(lambda: (m.backing / "tmp" / "o").exists(), 10)
        assert wait_for(lambda: "sub" in os.listdir(m.ctl("namespaces/c/namespaces")), 10)
        r = host_sh(f"echo c > {mnt}/.imafs/ns-create", pidns=False)
        assert "File exists" in r.stderr
        r = host_sh(f"echo c/sub > {mnt}/.imafs/ns-remove", pidns=False)
        assert r.returncode != 0
        r = host_sh(f"echo sub > {mnt}/.imafs/namespaces/c/ns-remove", pidns=False)
        assert "Device or resource busy" in r.stderr     # its processes are alive
        r = host_sh(f"echo c > {mnt}/.imafs/ns-remove", pidns=False)
        assert "Device or resource busy" in r.stderr     # its pid namespace lives
        # c binds the container's pid namespace; sub, made inside it, a cgroup
        sub_id = buf_id(ns_bufs(m.ctl("namespaces/c/ascii_runtime_measurements"),
                                b"ns-create")[0])
        assert cg_dirs(m) == {f"ns{sub_id}": 1}
        assert re.search(r"namespace /c \(id \d+\) created; pid \d+ moved into it "
                         r"\(bound by its pid namespace\)", m.log_text())
        assert "namespace /c/sub (id %d) created; pid" % sub_id in m.log_text()
        assert "(bound by its cgroup)" in m.log_text()
    finally:
        p.kill()
        p.communicate()
    # the container's init died: the kernel killed the rest of its pid namespace
    assert wait_for(lambda: cg_dirs(m) == {f"ns{sub_id}": 0}, 10)
    # an exited namespace stays readable by its parent until removed
    assert b"/f" in names(m.ctl("namespaces/c/ascii_runtime_measurements").read_bytes())
    r = host_sh(f"echo c > {mnt}/.imafs/ns-remove", pidns=False)
    assert "Directory not empty" in r.stderr             # it has a child namespace
    log = m.log_text()
    for why in ("bad namespace name", "unknown option", "exists", "still has processes",
                "has child namespaces"):
        assert why in log, why
    r = host_sh(f"echo sub > {mnt}/.imafs/namespaces/c/ns-remove", pidns=False)
    assert r.returncode == 0, r.stderr
    before = m.ctl("namespaces/c/ascii_runtime_measurements").read_bytes()
    assert names(before)[-2:] == [b"ns-create", b"ns-remove"]
    r = host_sh(f"echo c > {mnt}/.imafs/ns-remove", pidns=False)
    assert r.returncode == 0, r.stderr
    assert os.listdir(m.ctl("namespaces")) == []
    assert cg_dirs(m) == {}                             # their cgroups are gone
    removed = ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-remove")
    assert [w.split()[1] for w in removed] == ["name=/c"]
    assert f"entries={len(names(before))}" in removed[0]
    # a new namespace of the same name is a new namespace: fresh list, new id
    r = host_sh(f"echo c > {mnt}/.imafs/ns-create", pidns=False)
    assert r.returncode == 0
    created = ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")
    assert buf_id(created[-1]) > sub_id
    assert names(m.ctl("namespaces/c/ascii_runtime_measurements").read_bytes()) == \
        [b"boot_aggregate", b"ns-init"]


def test_state_across_remount(ns_mount, world_tmp):
    """Tree, policies, lists and keys survive `imafs umount` + mount with the same
    --state; a process left in a namespace is still in it after the remount."""
    k = keygen(world_tmp / "k")

    def prepare(b):
        shutil.copy(k / "signing_cert.der", b / "keys" / "k.der")
        (b / "before").write_text("1")
        (b / "after").write_text("2")
    m = ns_mount(MEASURE_READS, prepare=prepare)
    mnt, tmp = m.mnt, m.backing / "tmp"
    # a process that stays in namespace "a" (outside the mount: it must not pin it)
    p = subprocess.Popen(["sh", "-c", f"""
        echo a > {mnt}/.imafs/ns-create && printf '{MEASURE_READS}' > {mnt}/.imafs/policy &&
        echo /keys/k.der > {mnt}/.imafs/keys && cat {mnt}/before > /dev/null &&
        sh -c 'echo b > {mnt}/.imafs/ns-create' && echo ok > {world_tmp}/ready || exit 1
        while [ ! -e {world_tmp}/go ]; do sleep 0.05; done
        cat {mnt}/after > /dev/null && cat {mnt}/.imafs/policy > {world_tmp}/policy &&
        ls {mnt}/.imafs/namespaces > {world_tmp}/ns && echo done > {world_tmp}/done
    """], cwd="/")
    try:
        assert wait_for(lambda: (world_tmp / "ready").exists(), 10)
        a = "namespaces/a/"
        state = {f: m.ctl(a + f).read_bytes() for f in
                 ("policy", "keys", "ascii_runtime_measurements", "pcrs/sha256")}
        host_list = m.ctl("ascii_runtime_measurements").read_bytes()
        m.restart(m.args)
        assert sorted(os.listdir(m.ctl("namespaces"))) == ["a"]
        assert os.listdir(m.ctl(a + "namespaces")) == ["b"]
        for f, v in state.items():
            assert m.ctl(a + f).read_bytes() == v, f
        assert m.ctl("ascii_runtime_measurements").read_bytes() == host_list
        (world_tmp / "go").touch()
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
        p.wait()
    assert (world_tmp / "policy").read_text().split() == MEASURE_READS.split()
    assert (world_tmp / "ns").read_text().split() == ["b"]
    after = names(m.ctl(a + "ascii_runtime_measurements").read_bytes())
    assert after[-1] == b"/after" and names(state["ascii_runtime_measurements"]) == after[:-1]
    assert m.ctl(a + "pcrs/sha256").read_bytes() != state["pcrs/sha256"]
    # ids continue after the remount
    r = host_sh(f"echo c > {mnt}/.imafs/ns-create", pidns=False)
    assert r.returncode == 0
    ids = [buf_id(x) for x in ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")]
    assert ids == sorted(set(ids)) and len(ids) == 2
