"""Behaviour models: learn, seal and enforce a workload's file behaviour (TSEM in user
space, after Greg Wettstein's Trusted Security Event Modeling and its Quixote tools).

A :class:`Model` belongs to one namespace. Every event of the namespace's tasks (see
:mod:`imafs.ima.modelmap`) is reduced to a coefficient, and the model's mode decides:

* ``learn``: a new coefficient joins the model (``trajectory`` describes it);
* ``sealed``: a coefficient outside the model is recorded in ``forensics`` and allowed;
* ``enforce``: a coefficient outside the model is refused (the engine answers EPERM),
  recorded in ``forensics``, and the task becomes *untrusted*: every later event of it
  and of every task it then starts is refused, in-model or not.

The mode only moves forward (learn -> sealed -> enforce). ``state`` is an extend over
the model's sorted unique coefficients (in-model and forensic) from the aggregate, so
it does not depend on scheduling; ``measurement`` extends each coefficient when first
seen, in time order, as a PCR would.

Tasks: the engine names each task by a stable key that survives pid reuse (e.g. the
tgid with its start time) and, the first time a task is seen, its parent's key. A task
first seen inherits its parent's identity and trust status; with no known parent it
starts from zero identities (the workload's first process). A task's identity changes
when it runs a program (a bprm_check event with ``identity``).

Files created inside the model (by an ``inode_create`` event the engine confirms with
:meth:`Verdict.created`) and files named by a pseudonym have a zero digest in their
CELL; a created file's path is its directory, an instance number and its creator's
identity (TSEM's rule, with the instance counted per task), so temporary names and
the content a workload writes do not change the model.

Bounds: one trajectory or forensics record per distinct coefficient with a count, at
most ``max_records`` each; at most ``max_points`` coefficients; the ``events`` stream
keeps ``stream_size`` lines for readers and drops (and counts) the rest, never blocking.
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Callable, Hashable, Iterator, NamedTuple, Sequence

from imafs.ima import modelmap as mm
from imafs.ima.modelmap import ZERO, Coe, Created, Event

LEARN, SEALED, ENFORCE = "learn", "sealed", "enforce"
MODES = (LEARN, SEALED, ENFORCE)

# Why an event was allowed or refused (Decision.reason, forensics "reason")
LEARNED = "learned"            # learn mode: the coefficient joined the model
IN_MODEL = "in-model"
OUT_OF_MODEL = "out-of-model"
UNTRUSTED = "untrusted"        # refused: the task (or an ancestor) is untrusted
MODEL_FULL = "model-full"      # max_points reached: not stored


class ModelError(ValueError):
    """A command the model refuses (a mode going back, a model file that does not
    fit this model)."""


class Actor(NamedTuple):
    """Who acts: the task's stable key, its parent's key (used the first time the
    task is seen), its credentials, and its pid and name for the records only.
    ``lineage``: when a model does not know ``parent`` (or it is None), a callable
    giving the keys of the task's further ancestors, nearest first; the first one the
    model knows is taken as the parent (a process that forked without acting through
    the mount between the task and that ancestor)."""
    key: Hashable
    parent: Hashable | None
    coe: Coe
    pid: int = 0
    comm: str = ""
    lineage: Callable[[], Iterator[Hashable]] | None = None


class Decision(NamedTuple):
    allowed: bool
    reason: str
    coefficient: bytes


class Task:
    """A task as the model knows it. ``instances``: how many files it created in each
    directory (a created file's instance number; counted per task, so a run's numbers
    do not depend on other tasks nor on earlier runs)."""
    __slots__ = ("parent_id", "task_id", "untrusted", "instances")

    def __init__(self, parent_id: bytes, task_id: bytes, untrusted: bool):
        self.parent_id = parent_id
        self.task_id = task_id
        self.untrusted = untrusted
        self.instances: dict[bytes, int] | None = None


class EventStream:
    """Every event as a JSON line for an external agent. ``put`` never blocks: with
    no reader open, or ``capacity`` lines waiting, the line is dropped and counted.
    ``notify`` (set by the reader's side, must not block) is called after a put."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.readers = 0
        self.dropped = 0
        self.notify: Callable[[], None] | None = None
        self._lines: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            self.readers += 1

    def close(self) -> None:
        with self._lock:
            self.readers = max(0, self.readers - 1)
            if not self.readers:
                self.dropped += len(self._lines)
                self._lines.clear()

    def wants(self) -> bool:
        """Would a put now be kept? (Saves building a line nobody takes.)"""
        if self.readers and len(self._lines) < self.capacity:
            return True
        with self._lock:
            self.dropped += 1
        return False

    def put(self, line: str) -> None:
        with self._lock:
            if not self.readers:
                self.dropped += 1
                return
            self._lines.append(line)
        if self.notify is not None:
            self.notify()

    def take(self, n: int = 1 << 30) -> list[str]:
        with self._lock:
            out = []
            while self._lines and len(out) < n:
                out.append(self._lines.popleft())
            return out

    def __len__(self) -> int:
        return len(self._lines)


class _Assessed(NamedTuple):
    """What assess() found, for commit()."""
    model: "Model"
    actor: Actor
    task: Task
    parent_id: bytes           # the identities the coefficient was mapped with
    task_id: bytes
    event: Event
    values: tuple              # resolved CELL values
    coefficient: bytes
    allowed: bool
    reason: str
    created: Created | None    # the instance an inode_create names
    new_identity: bytes | None


class Model:
    def __init__(self, aggregate: bytes = ZERO, base: bytes = ZERO, *,
                 max_points: int = 1 << 20, max_records: int = 1 << 16,
                 max_tasks: int = 1 << 16, max_created: int = 1 << 16,
                 stream_size: int = 4096,
                 alive: Callable[[Hashable], bool] | None = None):
        if len(aggregate) != mm.DIGEST_SIZE or len(base) != mm.DIGEST_SIZE:
            raise ModelError("the aggregate and the base are 32-byte sha256 values")
        self.aggregate = bytes(aggregate)
        self.base = bytes(base)
        self.mode = LEARN
        self.max_points, self.max_records = max_points, max_records
        self.max_tasks, self.max_created = max_tasks, max_created
        self.alive = alive
        self.lock = threading.RLock()
        self.points: set[bytes] = set()          # in the model
        self.forensic_points: set[bytes] = set()  # seen outside it (sealed, enforce)
        self.pseudonyms: set[bytes] = set()
        self.tasks: dict[Hashable, Task] = {}
        self.created: dict[Hashable, Created] = {}
        # coefficient -> [count, number, _Assessed, reason]; described when read
        self._trajectory: dict[bytes, list] = {}
        self._forensics: dict[bytes, list] = {}
        self.stream = EventStream(stream_size)
        self.measurement = mm.extend(ZERO, self.aggregate, self.base)
        self._state: bytes | None = None
        self.number = 0
        self.counts = collections.Counter()

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: str) -> None:
        """learn -> sealed -> enforce; never back."""
        if mode not in MODES:
            raise ModelError(f"unknown model mode {mode!r} (one of {', '.join(MODES)})")
        with self.lock:
            if MODES.index(mode) < MODES.index(self.mode):
                raise ModelError(f"a {self.mode} model cannot go back to {mode}")
            self.mode = mode

    def seal(self) -> None:
        self.set_mode(SEALED)

    def enforce(self) -> None:
        self.set_mode(ENFORCE)

    def add_pseudonym(self, path) -> None:
        """The file at PATH (inside the mount) is mutable: its digest is left out of
        the coefficients of its events."""
        self.add_pseudonym_digest(mm.pseudonym(path))

    def add_pseudonym_digest(self, value: bytes) -> None:
        if len(value) != mm.DIGEST_SIZE:
            raise ModelError("a pseudonym is a 32-byte sha256 value")
        with self.lock:
            self.pseudonyms.add(bytes(value))

    # ------------------------------------------------------------------ tasks
    def task(self, actor: Actor) -> Task:
        """The task's record, made the first time from its parent's."""
        t = self.tasks.get(actor.key)
        if t is not None:
            return t
        # the parent, found without the lock (lineage may read /proc)
        parent = self.tasks.get(actor.parent) if actor.parent is not None else None
        if parent is None and actor.lineage is not None:
            for key in actor.lineage():
                parent = self.tasks.get(key)
                if parent is not None:
                    break
        with self.lock:
            t = self.tasks.get(actor.key)
            if t is not None:
                return t
            if parent is None:
                t = Task(ZERO, ZERO, False)
            else:
                t = Task(parent.task_id, parent.task_id, parent.untrusted)
            if len(self.tasks) >= self.max_tasks:
                self._reap()
            self.tasks[actor.key] = t
            return t

    def _reap(self) -> None:
        """Drop the records of tasks that no longer exist (the engine's ``alive``)."""
        if self.alive is None:
            return
        for key in [k for k in self.tasks if not self.alive(k)]:
            del self.tasks[key]
        self.counts["tasks_reaped"] += 1

    def forget_task(self, key: Hashable) -> None:
        with self.lock:
            self.tasks.pop(key, None)

    def forget_file(self, key: Hashable) -> None:
        """The file is gone (its last link removed): its key may name another."""
        with self.lock:
            self.created.pop(key, None)

    # ------------------------------------------------------------------ events
    def _resolve(self, task: Task, event: Event) -> tuple[tuple, Created | None]:
        """The CELL values as this model sees them: a file created inside it is named
        by its instance and has a zero digest; a pseudonym's digest is zero."""
        created = None
        vals = list(event.values)
        for ref in event.refs:
            i, kind, path, key = ref
            c = self.created.get(key) if key is not None else None
            if kind is mm.PATH:
                if c is not None:
                    vals[i] = c._replace(dir=path[:path.rindex(b"/") + 1])
                elif event.creates:
                    d = path[:path.rindex(b"/") + 1]
                    n = task.instances.get(d, 0) if task.instances else 0
                    created = Created(d, n + 1, task.task_id)
                    vals[i] = created
            elif c is not None or (self.pseudonyms and mm.pseudonym(path) in self.pseudonyms):
                vals[i] = ZERO
        return tuple(vals), created

    def _substitutes(self, event: Event) -> bool:
        """Does this model name a part of the event otherwise than the event does (a
        file created inside it, a pseudonym)?"""
        if self.created:
            for ref in event.refs:
                if ref[3] is not None and ref[3] in self.created:
                    return True
        return bool(self.pseudonyms) and event.pseudonym() in self.pseudonyms

    def assess(self, actor: Actor, event: Event) -> _Assessed:
        """Map the event and say what this model would answer; nothing recorded."""
        task = self.tasks.get(actor.key) or self.task(actor)
        coe_id = mm.coe_digest(actor.coe)
        with self.lock:
            if event.creates or self._substitutes(event):
                values, created = self._resolve(task, event)
                cell_id = mm.cell_id(event.name, values)
            else:
                values, created, cell_id = event.values, None, event.cell_id()
            coef = mm.coefficient_of(event.bname, task.parent_id, task.task_id, coe_id,
                                     cell_id)
            new_id = (mm.task_identity_of(task.parent_id, coe_id, cell_id)
                      if event.identity else None)
            if task.untrusted:
                allowed, reason = self.mode != ENFORCE, UNTRUSTED
            elif coef in self.points:
                allowed, reason = True, IN_MODEL
            elif self.mode == LEARN:
                allowed, reason = True, LEARNED
            else:
                allowed, reason = self.mode != ENFORCE, OUT_OF_MODEL
            return _Assessed(self, actor, task, task.parent_id, task.task_id, event, values,
                             coef, allowed, reason, created, new_id)

    def commit(self, a: _Assessed, happened: bool = True) -> Decision:
        """Record an assessed event. ``happened``: False when another model of the
        chain refused it (the event did not take place: nothing is learned, and a
        sealed model records nothing; an enforcing model that refused it still
        records its own refusal)."""
        with self.lock:
            self.number += 1
            reason, coef = a.reason, a.coefficient
            if reason == IN_MODEL or (reason == LEARNED and coef in self.points):
                if happened:
                    r = self._trajectory.get(coef)
                    if r is not None:
                        r[0] += 1
                reason = IN_MODEL
            elif reason == LEARNED:
                if not happened:
                    reason = "not-learned"        # another model refused it
                elif self._add_point(self.points, coef):
                    self._record(self._trajectory, a, None)
                else:
                    reason = MODEL_FULL
            elif reason == OUT_OF_MODEL:
                if happened or not a.allowed:
                    if coef not in self.forensic_points:
                        self._add_point(self.forensic_points, coef)
                    self._record(self._forensics, a, OUT_OF_MODEL)
                    if self.mode == ENFORCE:
                        a.task.untrusted = True
            elif reason == UNTRUSTED:
                self._record(self._forensics, a, UNTRUSTED)
            if happened and a.allowed:
                if a.new_identity is not None:
                    a.task.task_id = a.new_identity
                if a.created is not None:
                    if a.task.instances is None:
                        a.task.instances = {}
                    if len(a.task.instances) < 4096 or a.created.dir in a.task.instances:
                        a.task.instances[a.created.dir] = a.created.instance
            self.counts[reason] += 1
            if self.stream.wants():
                self.stream.put(self._line(a, {"decision": "allowed" if a.allowed and happened
                                               else "refused", "reason": reason}))
            return Decision(a.allowed, reason, coef)

    def decide(self, actor: Actor, event: Event) -> Decision:
        """Assess and commit one event against this model alone."""
        return self.commit(self.assess(actor, event))

    def file_created(self, created: Created | None, key: Hashable) -> None:
        """The inode_create that named ``created`` made the file known by ``key``."""
        if created is None or key is None:
            return
        with self.lock:
            if key in self.created or len(self.created) < self.max_created:
                self.created[key] = created

    # ------------------------------------------------------------------ points, records
    def _add_point(self, where: set, coef: bytes) -> bool:
        if len(self.points) + len(self.forensic_points) >= self.max_points:
            self.counts["points_dropped"] += 1
            return False
        where.add(coef)
        self.measurement = mm.extend(self.measurement, coef, self.base)
        self._state = None
        return True

    def _record(self, records: dict, a: _Assessed, reason: str | None) -> None:
        r = records.get(a.coefficient)
        if r is not None:
            r[0] += 1
        elif len(records) < self.max_records:
            # described when first read (a learning run makes many records, reads are
            # rare), then kept as text: [count, number, assessed | None, reason, text]
            records[a.coefficient] = [1, self.number, a, reason, None]
        else:
            self.counts["records_dropped"] += 1

    def _line(self, a: _Assessed, extra: dict, number: int | None = None,
              close: bool = True) -> str:
        d = {"number": self.number if number is None else number,
             "event": {"type": a.event.name, "pid": a.actor.pid, "comm": a.actor.comm,
                       "p_task_id": a.parent_id.hex(), "task_id": a.task_id.hex()},
             "COE": a.actor.coe.describe(),
             a.event.name: mm.describe_cell(a.event.name, a.values),
             "coefficient": a.coefficient.hex()}
        if a.new_identity is not None:
            d["event"]["new_task_id"] = a.new_identity.hex()
        d.update(extra)
        s = json.dumps(d, ensure_ascii=True)
        return s + "\n" if close else s[:-1]

    def trajectory(self) -> Iterator[str]:
        """One JSON line per distinct in-model coefficient learned, with its count."""
        return self._records(self._trajectory)

    def forensics(self) -> Iterator[str]:
        """One JSON line per distinct coefficient refused or outside the model."""
        return self._records(self._forensics)

    def _records(self, records: dict) -> Iterator[str]:
        with self.lock:
            items = [(r[0], r) for r in records.values()]
        for count, r in items:
            body, a = r[4], r[2]
            if body is None and a is None:  # another reader described it just now
                body = r[4]
            elif body is None:
                body = self._line(a, {"reason": r[3]} if r[3] else {}, r[1], close=False)
                r[4] = body                 # the description replaces what it describes
                r[2] = None                 # (in this order: see the line above)
            yield f'{body}, "count": {count}}}\n'

    # ------------------------------------------------------------------ values
    def state(self) -> bytes:
        with self.lock:
            if self._state is None:
                self._state = mm.compute_state(self.aggregate,
                                               self.points | self.forensic_points, self.base)
            return self._state

    def stats(self) -> dict:
        with self.lock:
            return {"mode": self.mode, "points": len(self.points),
                    "forensic_points": len(self.forensic_points),
                    "pseudonyms": len(self.pseudonyms), "tasks": len(self.tasks),
                    "untrusted_tasks": sum(t.untrusted for t in self.tasks.values()),
                    "created_files": len(self.created), "events": self.number,
                    "trajectory_records": len(self._trajectory),
                    "forensics_records": len(self._forensics),
                    "stream_dropped": self.stream.dropped, **self.counts}

    # ------------------------------------------------------------------ model files
    def export(self):
        """The model as a :class:`~imafs.ima.modelfile.ModelFile` (in-model
        coefficients only, sealed)."""
        from imafs.ima.modelfile import ModelFile
        with self.lock:
            points = sorted(self.points)
            return ModelFile(self.aggregate, self.base, tuple(sorted(self.pseudonyms)),
                             tuple(points), mm.compute_state(self.aggregate, points,
                                                             self.base), True)

    def load(self, mf) -> None:
        """Add a model file's coefficients and pseudonyms; seal when it says so. Only
        a learning model loads; the aggregate must be this model's (a model is tied
        to the platform it was learned on); a fresh model takes the file's base."""
        with self.lock:
            if self.mode != LEARN:
                raise ModelError(f"a {self.mode} model loads nothing (only a learning one)")
            if mf.aggregate != self.aggregate:
                raise ModelError(f"the model's aggregate {mf.aggregate.hex()} is not this "
                                 f"namespace's {self.aggregate.hex()}")
            if mf.base != self.base:
                if self.number or self.points or self.forensic_points:
                    raise ModelError("the model's base differs from this model's, which "
                                     "has events already")
                self.base = mf.base
                self.measurement = mm.extend(ZERO, self.aggregate, self.base)
            new = [p for p in mf.coefficients if p not in self.points]
            if len(self.points) + len(self.forensic_points) + len(new) > self.max_points:
                raise ModelError(f"the model has {len(mf.coefficients)} coefficients; "
                                 f"this one holds at most {self.max_points}")
            for p in new:
                self._add_point(self.points, p)
            self.pseudonyms.update(mf.pseudonyms)
            if mf.sealed:
                self.mode = SEALED


class Verdict(NamedTuple):
    """The answer of a chain of models: allowed unless an enforcing model refused."""
    allowed: bool
    decisions: tuple            # (model, Decision) per model, in chain order
    assessed: tuple

    @property
    def refused_by(self) -> list:
        return [m for m, d in self.decisions if not d.allowed]

    def created(self, key: Hashable) -> None:
        """The engine made the file an allowed inode_create named: each model learns
        its key."""
        for a in self.assessed:
            a.model.file_created(a.created, key)


def decide_chain(models: Sequence[Model], actor: Actor, event: Event) -> Verdict:
    """Check one event against every model of a namespace chain (the namespace's own
    and its ancestors'): refused when any enforcing model refuses, so a child
    namespace never escapes an ancestor's model. Each model maps the event with its
    own task identities; when one refuses, the others record nothing of an event that
    did not happen (a learning model does not learn it)."""
    if len(models) == 1:            # the common case, without the generators
        a = models[0].assess(actor, event)
        return Verdict(a.allowed, ((a.model, a.model.commit(a, happened=a.allowed)),), (a,))
    assessed = tuple([m.assess(actor, event) for m in models])
    allowed = True
    for a in assessed:
        allowed = allowed and a.allowed
    decisions = tuple([(a.model, a.model.commit(a, happened=allowed)) for a in assessed])
    return Verdict(allowed, decisions, assessed)


# ---------------------------------------------------------------------- control writes

CONTROL_WORDS = ("seal", "enforce", "pseudonym", "load")


class Command(NamedTuple):
    word: str
    path: bytes | None = None


def parse_control(data: bytes) -> list[Command]:
    """A write to a model's ``control`` file: one command a line, ``seal``,
    ``enforce``, ``pseudonym PATH`` or ``load PATH`` (PATH absolute, inside the
    mount, taken to the end of the line). Parsed whole before anything applies: a bad
    line refuses the write (ModelError naming the line)."""
    out = []
    for n, line in enumerate(bytes(data).split(b"\n"), 1):
        if not line.strip():
            continue
        word, _, arg = line.partition(b" ")
        w = word.decode("ascii", "replace")
        if w in ("seal", "enforce"):
            if arg.strip():
                raise ModelError(f"control line {n}: '{w}' takes no argument")
            out.append(Command(w))
        elif w in ("pseudonym", "load"):
            if not arg.startswith(b"/") or b"\0" in arg:
                raise ModelError(f"control line {n}: '{w}' takes an absolute path")
            out.append(Command(w, arg))
        else:
            raise ModelError(f"control line {n}: unknown command {w[:40]!r} "
                             f"(one of {', '.join(CONTROL_WORDS)})")
    if not out:
        raise ModelError("control: no command")
    return out


def apply_control(model: Model, commands: Sequence[Command],
                  read_model: Callable[[bytes], bytes]) -> None:
    """Apply parsed commands in order. ``read_model(path)`` returns a model file's
    bytes (the engine reads it, appraised as a POLICY_CHECK)."""
    from imafs.ima.modelfile import parse_model
    for c in commands:
        if c.word == "seal":
            model.seal()
        elif c.word == "enforce":
            model.enforce()
        elif c.word == "pseudonym":
            model.add_pseudonym(c.path)
        else:
            model.load(parse_model(read_model(c.path)))
