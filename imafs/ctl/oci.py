"""``imafs oci-hook``: the OCI runtime hook that gives a container an integrity
namespace made from the host before any of its code runs, and removes it after.

A runtime runs the hook with the container's state as JSON on stdin (``ociVersion``,
``id``, ``status``, ``pid`` of its init, ``bundle``, ``annotations``). In
``createRuntime`` (or ``prestart``; status ``creating``/``created``) the hook

1. finds the container's root: ``root.path`` of the bundle's ``config.json``
   (relative to the bundle), resolved; it must be an imafs mount point;
2. names the namespace after the container id (annotation ``org.imafs.namespace``
   overrides; names up to 64 characters, so 64-hex ids fit);
3. takes the policy, keys and options of the profile ``org.imafs.profile`` names (or
   the configuration's ``default_profile``), plus the words of annotation
   ``org.imafs.options`` and annotation ``org.imafs.model`` (``learn``, or a host
   model file: the same as the word ``model=VALUE``; host paths there only when the
   configuration allows them; an option both give is refused) -- profiles.py;
4. asks the mount's daemon over its control socket to create the namespace and bind
   the container's init (paused by the runtime until every hook has run), passing a
   pidfd of it, and remembers the namespace (its UUID) in its state directory.

In ``poststop`` (status ``stopped``) it archives the namespace's list where the
configuration says and removes it -- only a namespace it made for this container
(same id, bundle and UUID). Every failure is one line on stderr and a non-zero exit,
and leaves nothing half-made: the runtime then fails the container's creation.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from imafs.ctl.client import Client, CtlError, check_caller, mount_entry
from imafs.ctl.profiles import HookConfig, HostOptions, ProfileError, load_profile, \
    parse_option_words
from imafs.ima import nsoptions
from imafs.ima.nsoptions import OptionError

ANNOTATION_PROFILE = "org.imafs.profile"
ANNOTATION_NAMESPACE = "org.imafs.namespace"
ANNOTATION_OPTIONS = "org.imafs.options"
ANNOTATION_MODEL = "org.imafs.model"
MAX_STATE = 1 << 20
MAX_CONFIG = 4 << 20
CREATE_STATUSES = ("creating", "created")
STOP_STATUSES = ("stopped",)
STAGES = {"createRuntime": CREATE_STATUSES, "prestart": CREATE_STATUSES,
          "poststop": STOP_STATUSES}
_ID_RE = re.compile(r"[\w+.-]{1,1024}\Z")


class HookError(Exception):
    """Why the hook refused: one line."""


@dataclass
class OciState:
    oci_version: str
    id: str
    status: str
    pid: int
    bundle: str
    annotations: dict = field(default_factory=dict)
    has_annotations: bool = False


def parse_state(data: bytes) -> OciState:
    """The runtime's state JSON, checked field by field."""
    if len(data) > MAX_STATE:
        raise HookError(f"the container state on stdin is over {MAX_STATE} bytes")
    if not data.strip():
        raise HookError("no container state on stdin (run by an OCI runtime as a hook)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HookError(f"the container state on stdin is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HookError("the container state on stdin is not a JSON object")

    def get(key, kind, required=True):
        v = doc.get(key)
        if v is None:
            if required:
                raise HookError(f"the container state has no {key!r}")
            return None
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise HookError(f"the container state's {key!r} is not a "
                            f"{'number' if kind is int else 'string'}")
        return v

    st = OciState(oci_version=get("ociVersion", str), id=get("id", str),
                  status=get("status", str), pid=get("pid", int, False) or 0,
                  bundle=get("bundle", str))
    if not _ID_RE.match(st.id) or st.id in (".", ".."):
        raise HookError(f"container id {st.id[:80]!r} is not an OCI container id")
    if not st.bundle.startswith("/"):
        raise HookError(f"bundle {st.bundle!r} is not an absolute path")
    ann = doc.get("annotations")
    if ann is not None:
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in ann.items()):
            raise HookError("the container state's annotations are not strings")
        st.annotations, st.has_annotations = dict(ann), True
    return st


def bundle_config(bundle: str) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as e:
        raise HookError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise HookError(f"{path}: over {MAX_CONFIG} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise HookError(f"{path}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HookError(f"{path}: not a JSON object")
    return doc


def container_root(bundle: str, config: dict) -> str:
    """The imafs mount point that is the container's root (root.path, resolved)."""
    from imafs.fs.daemon import resolve_mountpoint
    root = config.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) \
            or not root["path"]:
        raise HookError(f"{bundle}/config.json has no root.path")
    path = root["path"]
    if not path.startswith("/"):
        path = os.path.join(bundle, path)
    real = resolve_mountpoint(path)
    m = mount_entry(real)
    if m is None:
        raise HookError(f"the container's root {real} is not a mount point: mount it with "
                        f"`imafs mount` first")
    if m["fstype"] != "fuse.imafs":
        raise HookError(f"the container's root {real} is a {m['fstype']} mount, not an "
                        f"imafs mount")
    return real


def _state_file(cfg: HookConfig, st: OciState) -> str:
    key = hashlib.sha256(f"{st.id}\0{os.path.normpath(st.bundle)}".encode()).hexdigest()
    return os.path.join(cfg.state_dir, key[:32] + ".json")


def _write_state(path: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, json.dumps(rec).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def host_options(st: OciState, cfg: HookConfig) -> tuple[HostOptions, str]:
    """The profile's and the annotations' options together; (options, profile name
    or "")."""
    profile = st.annotations.get(ANNOTATION_PROFILE) or cfg.default_profile or ""
    opts = HostOptions()
    try:
        if profile:
            opts = load_profile(cfg.profiles, profile)
        words = st.annotations.get(ANNOTATION_OPTIONS, "").split()
        model = st.annotations.get(ANNOTATION_MODEL, "").strip()
        if model:
            if any(w.startswith("model=") for w in words):
                raise ProfileError(f"model= is given by annotation {ANNOTATION_MODEL} and "
                                   f"by annotation {ANNOTATION_OPTIONS}")
            words.append(f"model={model}")
        if words:
            extra = parse_option_words(words, host_files=cfg.allow_host_paths,
                                       source=f"annotation {ANNOTATION_OPTIONS}",
                                       strict=True)
            opts.merge(extra, f"annotation {ANNOTATION_OPTIONS}",
                       f"profile {profile}" if profile else "nobody")
    except ProfileError as e:
        msg = str(e)
        if not cfg.allow_host_paths and "names a host" in msg:
            msg += (f" (host paths in annotations are off: allow_host_paths in "
                    f"{cfg.source})")
        raise HookError(msg) from None
    return opts, profile


def create(st: OciState, cfg: HookConfig, state: str | None = None) -> dict:
    """createRuntime/prestart: the container's namespace, made and bound."""
    if st.pid <= 0:
        raise HookError(f"the container state has no pid of the container's init "
                        f"(status {st.status})")
    config = bundle_config(st.bundle)
    if not st.has_annotations and isinstance(config.get("annotations"), dict):
        st.annotations = {k: v for k, v in config["annotations"].items()
                          if isinstance(k, str) and isinstance(v, str)}
    root = container_root(st.bundle, config)
    name = st.annotations.get(ANNOTATION_NAMESPACE) or st.id
    try:
        nsoptions.check_name(name)
    except OptionError as e:
        how = (f"annotation {ANNOTATION_NAMESPACE}" if ANNOTATION_NAMESPACE in st.annotations
               else f"container id (set annotation {ANNOTATION_NAMESPACE})")
        raise HookError(f"{how}: {e}") from None
    opts, profile = host_options(st, cfg)
    try:
        pidfd = os.pidfd_open(st.pid)
    except OSError as e:
        raise HookError(f"the container's init (pid {st.pid}): {e.strerror}") from None
    sfile = _state_file(cfg, st)
    try:
        with Client.for_mount(root, state=state) as c:
            rec = {"id": st.id, "bundle": st.bundle, "mountpoint": root, "name": name,
                   "uuid": None, "state": c.info.get("state")}
            try:
                _write_state(sfile, rec)
            except OSError as e:
                raise HookError(f"cannot write the hook's state {sfile}: {e.strerror}") \
                    from None
            try:
                ans = c.call("ns-create", name=name, pid=st.pid, options=opts.options,
                             policy=opts.policy,
                             certs=[base64.b64encode(d).decode() for d in opts.certs],
                             model=opts.model, fds={"pidfd": pidfd})
            except CtlError as e:
                # refused by the daemon: nothing was made, poststop has nothing to do;
                # no answer (a timeout, a broken connection): the namespace may exist,
                # so the provisional state stays and poststop removes it by name
                if e.errno:
                    _unlink(sfile)
                raise
            ns = ans["namespace"]
            rec["uuid"] = ns["uuid"]
            _write_state(sfile, rec)     # failing here: poststop removes it by name
            ns["profile"] = profile
            return ns
    except CtlError as e:
        raise HookError(_ctl_message(e, name)) from None
    finally:
        os.close(pidfd)


def _ctl_message(e: CtlError, name: str) -> str:
    if e.errno == "EEXIST":
        return f"{e} (another container's? choose another name with annotation " \
               f"{ANNOTATION_NAMESPACE})"
    return str(e)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove(st: OciState, cfg: HookConfig, state: str | None = None) -> dict | None:
    """poststop: archive and remove the namespace this hook made for the container
    (None: it made none -- its creation failed, or it never ran)."""
    sfile = _state_file(cfg, st)
    try:
        with open(sfile) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HookError(f"the hook's state {sfile}: {e}") from None
    dfd = None
    try:
        if cfg.archive:
            try:
                os.makedirs(cfg.archive, mode=0o700, exist_ok=True)
                dfd = os.open(cfg.archive, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise HookError(f"archive directory {cfg.archive}: {e.strerror}") from None
        try:
            with Client.for_mount(rec["mountpoint"], state=state) as c:
                deadline = time.monotonic() + cfg.remove_wait
                while True:
                    try:
                        ans = c.call("ns-remove", name=rec["name"], uuid=rec.get("uuid"),
                                     fds={"archive": dfd} if dfd is not None else None)
                        break
                    except CtlError as e:
                        if e.errno == "ENOENT":
                            _unlink(sfile)
                            return {"name": rec["name"], "gone": True}
                        if e.errno != "EBUSY" or time.monotonic() >= deadline:
                            raise
                        time.sleep(0.05)
        except CtlError as e:
            raise HookError(f"namespace {rec['name']} of container {st.id} not removed: "
                            f"{e}") from None
        _unlink(sfile)
        return ans["namespace"]
    finally:
        if dfd is not None:
            os.close(dfd)


def run(data: bytes, cfg: HookConfig, stage: str | None = None,
        state: str | None = None) -> dict | None:
    """The hook: the state on stdin (``data``), the configuration, the stage the
    runtime runs it in when the hook's arguments say so."""
    check_caller("imafs oci-hook")
    st = parse_state(data)
    if stage is not None:
        if stage not in STAGES:
            raise HookError(f"stage {stage!r}: imafs oci-hook runs in "
                            f"{', '.join(STAGES)}")
        if st.status not in STAGES[stage]:
            raise HookError(f"stage {stage} but the container is {st.status!r}")
    if st.status in CREATE_STATUSES:
        return create(st, cfg, state)
    if st.status in STOP_STATUSES:
        return remove(st, cfg, state)
    raise HookError(f"container {st.id} is {st.status!r}: imafs oci-hook belongs in the "
                    f"createRuntime (or prestart) and poststop hooks")


__all__ = ["run", "parse_state", "HookError", "OciState", "container_root", "create",
           "remove"]
