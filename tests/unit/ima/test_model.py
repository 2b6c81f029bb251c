"""Behaviour models without a mount: coefficients, task identities by exec lineage,
learn/sealed/enforce, state and measurement, records and bounds, pseudonyms, files
created inside a model, chains of models, and an independent recomputation of the
state from the trajectory (tests/helpers/model_ref.py, written from docs/models.md, not
with modelmap)."""
from __future__ import annotations

import hashlib
import json
import random
import struct
import threading

import pytest
from hypothesis import given, settings, strategies as st

from imafs.ima import model as M
from imafs.ima import modelmap as mm
from imafs.ima.modelfile import format_model, parse_model

from helpers.model_ref import LAYOUT, v_coefficient, v_measurement, v_state

ROOT = mm.Coe()
USER = mm.Coe(1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 0)
EXE = mm.Inode(0, 0, 0o100755)
REG = mm.Inode(0, 0, 0o100644)
DIR = mm.Inode(0, 0, 0o040755)
TMP = mm.Inode(0, 0, 0o041777)


def dig(name: str) -> bytes:
    """A stand-in for a file's sha256: different names, different contents."""
    return hashlib.sha256(b"content of " + name.encode()).digest()


def actor(key, parent=None, coe=ROOT):
    return M.Actor(key, parent, coe, pid=hash(key) & 0xFFFF, comm=str(key))


# --------------------------------------------------------------------- workloads
# A workload: tasks, each a script of actions; ("fork", child) makes the child
# runnable (the model first sees it at its first event, with the parent's key).

def sh_workload(n_jobs: int = 3):
    tasks = {
        "init": [("exec", "/bin/sh"), ("open", "/etc/profile", mm.MAY_READ)]
        + [("fork", f"job{i}") for i in range(n_jobs)]
        + [("fork", "writer")],
        "writer": [("exec", "/bin/busybox"), ("create", "/tmp/out"),
                   ("open", "/etc/hosts", mm.MAY_READ), ("chmod", "/etc/hosts", 0o600)],
    }
    for i in range(n_jobs):
        tasks[f"job{i}"] = [("exec", "/usr/bin/cat"), ("open", "/etc/passwd", mm.MAY_READ),
                            ("open", f"/srv/data{i % 2}", mm.MAY_READ),
                            ("mmap", "/lib/libc.so.6")]
    return tasks


def event_of(action, task_key):
    kind = action[0]
    if kind == "exec":
        return mm.bprm_check(action[1], EXE, dig(action[1]))
    if kind == "open":
        return mm.file_open(action[1], REG, dig(action[1]), action[2])
    if kind == "mmap":
        return mm.mmap_file(action[1], REG, dig(action[1]))
    if kind == "create":
        return mm.inode_create(TMP, action[1], 0o644)
    if kind == "chmod":
        return mm.inode_setattr(action[1], REG, mode=action[2])
    raise AssertionError(kind)


def run(model_or_chain, tasks, seed=None, tag="", coe=ROOT):
    """Run the workload's events in one interleaving (seed None: task by task, in
    order), its task keys prefixed with ``tag`` (another run: other processes).
    Returns the decisions."""
    rng = random.Random(seed)
    models = model_or_chain if isinstance(model_or_chain, list) else [model_or_chain]
    parents = {}
    pos = {t: 0 for t in tasks}
    runnable = ["init"] if "init" in tasks else [next(iter(tasks))]
    out = []
    while runnable:
        t = runnable[0] if seed is None else rng.choice(runnable)
        action = tasks[t][pos[t]]
        pos[t] += 1
        if pos[t] == len(tasks[t]):
            runnable.remove(t)
        if action[0] == "fork":
            parents[action[1]] = t
            runnable.append(action[1])
            continue
        p = parents.get(t)
        a = actor(tag + t, None if p is None else tag + p, coe)
        v = M.decide_chain(models, a, event_of(action, t))
        if action[0] == "create" and v.allowed:
            v.created(("file", tag + t, action[1]))
        out.append((t, action, v))
    return out


# --------------------------------------------------------------------- determinism

def test_same_events_any_interleaving_same_state_different_measurement():
    states, measurements = set(), set()
    for seed in [None] + list(range(12)):
        m = M.Model()
        run(m, sh_workload(), seed)
        states.add(m.state())
        measurements.add(m.measurement)
    assert len(states) == 1
    assert len(measurements) > 1       # the time-ordered value sees the scheduling


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 4))
def test_state_is_scheduling_independent(seed, jobs):
    a, b = M.Model(), M.Model()
    run(a, sh_workload(jobs), None)
    run(b, sh_workload(jobs), seed)
    assert a.state() == b.state()
    assert a.points == b.points


def test_learned_then_enforced_same_state_and_no_refusal():
    m = M.Model()
    run(m, sh_workload(), 1)
    learned = m.state()
    m.seal()
    m.enforce()
    out = run(m, sh_workload(), 7, tag="second run: ")
    assert all(v.allowed for *_, v in out)
    assert m.state() == learned
    assert not list(m.forensics())


def test_state_depends_on_aggregate_and_every_coefficient():
    a, b = M.Model(), M.Model(aggregate=b"\x01" * 32)
    run(a, sh_workload(), None)
    run(b, sh_workload(), None)
    assert a.points == b.points and a.state() != b.state()
    c = M.Model()
    run(c, sh_workload(), None)
    c.decide(actor("x"), mm.file_open("/etc/extra", REG, dig("x"), mm.MAY_READ))
    assert c.state() != a.state()


# --------------------------------------------------------------------- lineage

def test_same_binary_from_another_parent_is_another_coefficient():
    m = M.Model()
    sshd, getty = actor("sshd"), actor("getty")
    m.decide(sshd, mm.bprm_check("/usr/sbin/sshd", EXE, dig("sshd")))
    m.decide(getty, mm.bprm_check("/sbin/getty", EXE, dig("getty")))
    b1, b2 = actor("bash1", "sshd"), actor("bash2", "getty")
    e1 = m.decide(b1, mm.bprm_check("/bin/bash", EXE, dig("bash")))
    e2 = m.decide(b2, mm.bprm_check("/bin/bash", EXE, dig("bash")))
    assert e1.coefficient != e2.coefficient
    assert m.tasks["bash1"].task_id != m.tasks["bash2"].task_id
    r1 = m.decide(b1, mm.file_open("/etc/shadow", REG, dig("shadow"), mm.MAY_READ))
    r2 = m.decide(b2, mm.file_open("/etc/shadow", REG, dig("shadow"), mm.MAY_READ))
    assert r1.coefficient != r2.coefficient
    # the same parent identity (another sshd process) gives the same coefficients
    sshd2 = actor("sshd2")
    m.decide(sshd2, mm.bprm_check("/usr/sbin/sshd", EXE, dig("sshd")))
    b3 = actor("bash3", "sshd2")
    assert m.decide(b3, mm.bprm_check("/bin/bash", EXE, dig("bash"))).coefficient \
        == e1.coefficient
    assert m.tasks["bash3"].task_id == m.tasks["bash1"].task_id


def test_identity_follows_program_digest_and_creds():
    m = M.Model()
    for key, d, coe in (("a", dig("cat"), ROOT), ("b", dig("cat-modified"), ROOT),
                        ("c", dig("cat"), USER)):
        m.decide(actor(key, coe=coe), mm.bprm_check("/bin/cat", EXE, d))
    ids = {k: m.tasks[k].task_id for k in "abc"}
    assert len(set(ids.values())) == 3
    # a forked child inherits its parent's identity and takes it as its parent id
    m.decide(actor("a-child", "a"), mm.file_open("/x", REG, dig("x"), mm.MAY_READ))
    t = m.tasks["a-child"]
    assert t.parent_id == t.task_id == ids["a"]


def test_script_runs_as_its_interpreter():
    """The exec open of a script is a bprm_check of the old identity; only the
    interpreter (identity=True) changes the task's identity."""
    m = M.Model()
    a = actor("t")
    m.decide(a, mm.bprm_check("/opt/run.sh", EXE, dig("run.sh"), identity=False))
    assert m.tasks["t"].task_id == mm.ZERO
    m.decide(a, mm.bprm_check("/bin/sh", EXE, dig("sh")))
    assert m.tasks["t"].task_id != mm.ZERO


# --------------------------------------------------------------------- modes

def learned_model():
    m = M.Model()
    run(m, sh_workload(), None)
    return m


def test_sealed_records_and_allows():
    m = learned_model()
    m.seal()
    a = actor("job0'", None)
    m.decide(a, mm.bprm_check("/bin/sh", EXE, dig("/bin/sh")))
    d = m.decide(a, mm.file_open("/etc/shadow", REG, dig("shadow"), mm.MAY_READ))
    assert d.allowed and d.reason == M.OUT_OF_MODEL
    assert not m.tasks["job0'"].untrusted
    d2 = m.decide(a, mm.file_open("/etc/shadow", REG, dig("shadow"), mm.MAY_READ))
    recs = [json.loads(line) for line in m.forensics()]
    assert len(recs) == 1 and recs[0]["count"] == 2 and recs[0]["reason"] == "out-of-model"
    assert d2.coefficient in m.forensic_points and d2.coefficient not in m.points


def test_enforce_refuses_and_untrusted_propagates_to_children():
    m = learned_model()
    m.enforce()
    init = actor("init2")
    assert m.decide(init, mm.bprm_check("/bin/sh", EXE, dig("/bin/sh"))).allowed
    job = actor("jobA", "init2")
    assert m.decide(job, mm.bprm_check("/usr/bin/cat", EXE, dig("/usr/bin/cat"))).allowed
    assert m.decide(job, mm.file_open("/etc/passwd", REG, dig("/etc/passwd"),
                                      mm.MAY_READ)).allowed
    # reading a file the workload never read
    d = m.decide(job, mm.file_open("/etc/shadow", REG, dig("shadow"), mm.MAY_READ))
    assert not d.allowed and d.reason == M.OUT_OF_MODEL
    assert m.tasks["jobA"].untrusted
    # an in-model event of the untrusted task is refused now
    d = m.decide(job, mm.file_open("/etc/passwd", REG, dig("/etc/passwd"), mm.MAY_READ))
    assert not d.allowed and d.reason == M.UNTRUSTED
    # a child it then starts, even for in-model events, and the child's children
    kid = actor("kid", "jobA")
    assert not m.decide(kid, mm.file_open("/etc/passwd", REG, dig("/etc/passwd"),
                                          mm.MAY_READ)).allowed
    grandkid = actor("grandkid", "kid")
    assert not m.decide(grandkid, mm.bprm_check("/usr/bin/cat", EXE,
                                                dig("/usr/bin/cat"))).allowed
    # a sibling (not a descendant) is not affected
    sib = actor("jobB", "init2")
    assert m.decide(sib, mm.bprm_check("/usr/bin/cat", EXE, dig("/usr/bin/cat"))).allowed
    assert not m.tasks["init2"].untrusted
    reasons = sorted(json.loads(line)["reason"] for line in m.forensics())
    assert reasons == ["out-of-model", "untrusted", "untrusted", "untrusted"]


@pytest.mark.parametrize("attack", ["new-binary", "lineage", "chmod", "tampered-binary"])
def test_enforce_refuses_each_kind_of_deviation(attack):
    m = learned_model()
    m.enforce()
    init = actor("i")
    m.decide(init, mm.bprm_check("/bin/sh", EXE, dig("/bin/sh")))
    t = actor("t", "i")
    if attack == "new-binary":
        ev = mm.bprm_check("/usr/bin/nc", EXE, dig("nc"))
    elif attack == "tampered-binary":
        ev = mm.bprm_check("/usr/bin/cat", EXE, dig("cat, modified"))
    elif attack == "lineage":       # cat, which the workload ran from sh, run by busybox
        assert m.decide(t, mm.bprm_check("/bin/busybox", EXE, dig("/bin/busybox"))).allowed
        t = actor("t2", "t")
        ev = mm.bprm_check("/usr/bin/cat", EXE, dig("/usr/bin/cat"))
        assert not m.tasks["t"].untrusted
    else:
        m.decide(t, mm.bprm_check("/usr/bin/cat", EXE, dig("/usr/bin/cat")))
        ev = mm.inode_setattr("/etc/passwd", REG, mode=0o666)
    d = m.decide(t, ev)
    assert not d.allowed and d.reason == M.OUT_OF_MODEL
    assert m.tasks[t.key].untrusted


def test_mode_goes_forward_only():
    m = M.Model()
    m.enforce()
    for mode in ("learn", "sealed"):
        with pytest.raises(M.ModelError, match="cannot go back"):
            m.set_mode(mode)
    with pytest.raises(M.ModelError, match="unknown model mode"):
        m.set_mode("permissive")
    assert m.mode == M.ENFORCE


# --------------------------------------------------------------------- pseudonyms, created files

def test_pseudonym_leaves_the_digest_out():
    m = M.Model()
    a = actor("t")
    d1 = m.decide(a, mm.file_open("/var/log/app.log", REG, dig("v1"), mm.MAY_APPEND))
    d2 = m.decide(a, mm.file_open("/var/log/app.log", REG, dig("v2"), mm.MAY_APPEND))
    assert d1.coefficient != d2.coefficient
    m.add_pseudonym("/var/log/app.log")
    d3 = m.decide(a, mm.file_open("/var/log/app.log", REG, dig("v3"), mm.MAY_APPEND))
    d4 = m.decide(a, mm.file_open("/var/log/app.log", REG, dig("v4"), mm.MAY_APPEND))
    assert d3.coefficient == d4.coefficient
    # only that path
    d5 = m.decide(a, mm.file_open("/var/log/other.log", REG, dig("v5"), mm.MAY_APPEND))
    d6 = m.decide(a, mm.file_open("/var/log/other.log", REG, dig("v6"), mm.MAY_APPEND))
    assert d5.coefficient != d6.coefficient
    # TSEM's form: H(length u32 || name)
    name = b"/var/log/app.log"
    assert m.pseudonyms == {hashlib.sha256(struct.pack("<I", len(name)) + name).digest()}


def test_created_files_named_by_instance_with_zero_digest():
    """Temporary names and the content a workload writes do not change its model."""
    def session(names, contents):
        m = M.Model()
        a = actor("t")
        m.decide(a, mm.bprm_check("/usr/bin/sort", EXE, dig("sort")))
        for name, content in zip(names, contents):
            v = M.decide_chain([m], a, mm.inode_create(TMP, "/tmp/" + name, 0o600))
            v.created(("ino", name))
            m.decide(a, mm.file_open("/tmp/" + name, REG, dig(content), mm.MAY_WRITE,
                                     key=("ino", name)))
            m.decide(a, mm.inode_unlink(TMP, "/tmp/" + name, REG, key=("ino", name)))
        return m
    a = session(["sortA1b2", "sortQ9z8"], ["x", "y"])
    b = session(["sortKk3J", "sort0000"], ["other", "bytes"])
    assert a.state() == b.state()
    recs = [json.loads(line) for line in a.trajectory()]
    created = [r for r in recs if r["event"]["type"] == "file_open"]
    assert [r["file_open"]["path"]["instance"] for r in created] == [1, 2]
    assert all(r["file_open"]["digest"] == "00" * 32 for r in created)
    # a file that was not created in the model keeps its name and digest
    c = session(["same"], ["x"])
    d = c.decide(actor("t"), mm.file_open("/tmp/other", REG, dig("z"), mm.MAY_READ))
    rec = [json.loads(line) for line in c.trajectory()][-1]
    assert rec["coefficient"] == d.coefficient.hex()
    assert rec["file_open"]["path"] == {"pathname": "/tmp/other"}


# --------------------------------------------------------------------- chains

def test_chain_child_never_escapes_an_enforcing_ancestor():
    parent = learned_model()
    parent.enforce()
    child = M.Model()                     # a learning namespace inside it
    chain = [child, parent]
    out = run(chain, sh_workload(), 3, tag="in child: ")
    assert all(v.allowed for *_, v in out)
    assert child.points                   # the child learned the allowed events
    t = actor("intruder", None)
    v = M.decide_chain(chain, t, mm.bprm_check("/usr/bin/nc", EXE, dig("nc")))
    assert not v.allowed and v.refused_by == [parent]
    assert v.decisions[1][1].coefficient not in child.points   # nothing learned
    assert parent.tasks["intruder"].untrusted
    assert not child.tasks["intruder"].untrusted
    n = len(child.points)
    v = M.decide_chain(chain, t, mm.file_open("/etc/passwd", REG, dig("/etc/passwd"),
                                              mm.MAY_READ))
    assert not v.allowed and len(child.points) == n


def test_chain_sealed_child_records_only_what_happened():
    parent, child = M.Model(), M.Model()
    child.seal()
    parent.enforce()
    v = M.decide_chain([child, parent], actor("t"),
                       mm.file_open("/a", REG, dig("a"), mm.MAY_READ))
    assert not v.allowed
    assert not list(child.forensics()) and list(parent.forensics())


# --------------------------------------------------------------------- bounds, stream

def test_one_record_per_coefficient_with_count():
    m = M.Model()
    a = actor("t")
    for _ in range(1000):
        m.decide(a, mm.file_open("/etc/passwd", REG, dig("p"), mm.MAY_READ))
    recs = [json.loads(line) for line in m.trajectory()]
    assert len(recs) == 1 and recs[0]["count"] == 1000
    assert m.stats()["events"] == 1000


def test_records_and_points_are_bounded():
    m = M.Model(max_records=10, max_points=50)
    a = actor("t")
    for i in range(60):
        d = m.decide(a, mm.file_open(f"/f{i}", REG, dig(str(i)), mm.MAY_READ))
        assert d.allowed
    assert len(list(m.trajectory())) == 10
    assert len(m.points) == 50
    s = m.stats()
    assert s["records_dropped"] == 40 and s["points_dropped"] == 10
    assert s[M.MODEL_FULL] == 10
    m.enforce()
    assert not m.decide(a, mm.file_open("/f59", REG, dig("59"), mm.MAY_READ)).allowed


def test_stream_never_blocks_and_counts_drops():
    m = M.Model(stream_size=5)
    a = actor("t")
    for i in range(7):                      # no reader: every line dropped
        m.decide(a, mm.file_open(f"/f{i}", REG, dig(str(i)), mm.MAY_READ))
    assert m.stream.dropped == 7 and len(m.stream) == 0
    woken = []
    m.stream.notify = lambda: woken.append(1)
    m.stream.open()
    for i in range(8):
        m.decide(a, mm.file_open(f"/g{i}", REG, dig(str(i)), mm.MAY_READ))
    assert len(m.stream) == 5 and m.stream.dropped == 10 and len(woken) == 5
    lines = m.stream.take(3)
    assert [json.loads(x)["file_open"]["path"]["pathname"] for x in lines] == \
        ["/g0", "/g1", "/g2"]
    assert all(json.loads(x)["decision"] == "allowed" for x in lines)
    m.stream.close()
    assert len(m.stream) == 0 and m.stream.dropped == 12


def test_tasks_of_dead_processes_are_reaped():
    alive = set()
    m = M.Model(max_tasks=4, alive=lambda k: k in alive)
    for i in range(10):
        alive.add(i)
        if i >= 2:
            alive.discard(i - 2)
        m.decide(actor(i), mm.file_open("/x", REG, dig("x"), mm.MAY_READ))
    assert len(m.tasks) <= 4 and set(m.tasks) >= {8, 9}


def test_concurrent_events_same_state():
    """Threads deciding at once (the engine's workers) lose nothing."""
    evs = [(f"t{i % 5}", mm.file_open(f"/f{i % 40}", REG, dig(str(i % 40)), 1 << (i % 3)))
           for i in range(600)]
    seq = M.Model()
    for key, ev in evs:
        seq.decide(actor(key), ev)
    m = M.Model()

    def worker(part):
        for key, ev in part:
            m.decide(actor(key), ev)
    threads = [threading.Thread(target=worker, args=(evs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.points == seq.points and m.state() == seq.state()
    assert sum(json.loads(x)["count"] for x in m.trajectory()) == 600


# --------------------------------------------------------------------- control

def test_control_commands_parse_whole_and_apply():
    cmds = M.parse_control(b"pseudonym /var/log/x\nseal\n\nenforce\n")
    assert [c.word for c in cmds] == ["pseudonym", "seal", "enforce"]
    m = M.Model()
    M.apply_control(m, cmds, read_model=lambda p: pytest.fail("no load"))
    assert m.mode == M.ENFORCE and len(m.pseudonyms) == 1
    for bad, what in ((b"seal\nfrobnicate\n", "line 2"), (b"load relative\n", "line 1"),
                      (b"seal now\n", "line 1"), (b"\n", "no command")):
        with pytest.raises(M.ModelError, match=what):
            M.parse_control(bad)
    learned = learned_model()
    blob = format_model(learned.export())
    fresh = M.Model()
    M.apply_control(fresh, M.parse_control(b"load /models/m\n"),
                    read_model=lambda p: blob if p == b"/models/m" else b"")
    assert fresh.state() == learned.state() and fresh.mode == M.SEALED


# --------------------------------------------------------------------- export, load

def test_export_load_same_state_and_behaviour():
    learned = learned_model()
    learned.add_pseudonym("/var/log/x")
    text = format_model(learned.export())
    fresh = M.Model()
    fresh.load(parse_model(text))
    assert fresh.state() == learned.state()
    assert fresh.pseudonyms == learned.pseudonyms and fresh.mode == M.SEALED
    assert not list(fresh.trajectory())
    fresh.enforce()
    out = run(fresh, sh_workload(), 5, tag="fresh: ")
    assert all(v.allowed for *_, v in out)
    assert fresh.state() == learned.state()


def test_load_refuses_another_platform_and_a_sealed_model():
    blob = format_model(learned_model().export())
    other = M.Model(aggregate=b"\x07" * 32)
    with pytest.raises(M.ModelError, match="aggregate"):
        other.load(parse_model(blob))
    sealed = M.Model()
    sealed.seal()
    with pytest.raises(M.ModelError, match="loads nothing"):
        sealed.load(parse_model(blob))
    assert not sealed.points


# --------------------------------------------------------------------- independent check
# tests/helpers/model_ref.py recomputes from docs/models.md, with no imafs encoder.

def every_event_workload(m: M.Model):
    a = actor("w")
    evs = [mm.bprm_check("/bin/sh", EXE, dig("sh")),
           mm.file_open("/etc/passwd", REG, dig("passwd"), mm.MAY_READ),
           mm.file_open("/data/caf\xe9\udcff", REG, None, mm.MAY_READ | mm.MAY_WRITE),
           mm.mmap_file("/lib/libc.so.6", REG, dig("libc")),
           mm.inode_mkdir(DIR, "/srv/new", 0o755),
           mm.inode_rmdir(DIR, "/srv/old", DIR),
           mm.inode_unlink(TMP, "/tmp/junk", REG),
           mm.inode_rename(DIR, "/srv/a", REG, DIR, "/srv/b", target=REG),
           mm.inode_rename(DIR, "/srv/c", REG, TMP, "/tmp/d"),
           mm.inode_link("/srv/b", REG, DIR, "/srv/b2"),
           mm.inode_symlink(DIR, "/srv/l", b"../etc/\xff"),
           mm.inode_setattr("/srv/b", REG, mode=0o600, uid=5, size=1 << 40, mtime=True),
           mm.inode_setxattr("/srv/b", REG, b"user.k", b"\x00\x01v", 1),
           mm.inode_removexattr("/srv/b", REG, b"user.k")]
    for e in evs:
        m.decide(a, e)
    v = M.decide_chain([m], a, mm.inode_create(TMP, "/tmp/tmpXYZ", 0o600))
    v.created("tmpkey")
    m.decide(a, mm.file_open("/tmp/tmpXYZ", REG, dig("w"), mm.MAY_WRITE, key="tmpkey"))
    m.decide(actor("w-kid", "w", USER), mm.bprm_check("/bin/cat", EXE, dig("cat")))


def test_independent_recomputation_of_the_state_from_trajectory():
    aggregate = bytes(range(32))
    m = M.Model(aggregate=aggregate)
    every_event_workload(m)
    run(m, sh_workload(), 2)
    recs = [json.loads(line) for line in m.trajectory()]
    assert {r["event"]["type"] for r in recs} == set(LAYOUT)
    points = []
    for r in recs:
        coef = v_coefficient(r)
        assert coef.hex() == r["coefficient"], r
        points.append(coef)
    assert v_state(aggregate, points) == m.state()
    # the measurement: each new coefficient, in order of first occurrence
    order = [r["coefficient"] for r in sorted(recs, key=lambda r: r["number"])]
    assert v_measurement(aggregate, order) == m.measurement


def test_independent_recomputation_in_enforce_mode_includes_forensics():
    m = learned_model()
    m.enforce()
    run(m, {"init": [("exec", "/bin/sh"), ("open", "/etc/shadow", mm.MAY_READ),
                     ("open", "/etc/passwd", mm.MAY_READ)]}, None, tag="2: ")
    a = actor("other")
    m.decide(a, mm.inode_setattr("/etc/hosts", REG, mode=0o777))
    model_points = list(m.points)
    forensic = [json.loads(line) for line in m.forensics()]
    out_of_model = [bytes.fromhex(r["coefficient"]) for r in forensic
                    if r["reason"] == "out-of-model"]
    for r in forensic:
        assert v_coefficient(r).hex() == r["coefficient"]
    assert len(out_of_model) == 2
    assert v_state(bytes(32), model_points + out_of_model) == m.state()
    exported = parse_model(format_model(m.export()))
    assert v_state(bytes(32), exported.coefficients) == exported.state
