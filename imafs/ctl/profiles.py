"""Host-side namespace options: profiles, the OCI hook's configuration, and the host
files that ``policy=``, ``keys=`` and ``model=PATH`` name, loaded into what a
control-socket request carries (the policy's text, the certificates, the model file's
text).

A **profile** is a directory ``PROFILES/NAME/`` (default PROFILES:
``/etc/imafs/profiles``) the host's administrator writes, because whoever creates a
container sets its annotations: ``policy`` (rules; absent: none), ``keys/``
(certificates, as ``--keys`` takes them; absent: none), ``model`` (a model file the
namespace's behaviour model starts from; absent: none, or ``model=learn`` among the
options) and ``options`` (words of the
namespace-options grammar, ``#`` comments; absent: none; ``policy=`` and ``keys=``
are the profile's own files, not options). Every part is checked to be root's and
writable by nobody else (the PROFILES directory, the profile's directory, each
file and certificate; symbolic links are refused), so a container's creator can
only choose among the administrator's profiles.

The hook's **configuration** (``/etc/imafs/oci-hook.conf``; absent: defaults; root's
and writable by nobody else when present) is ``KEY = VALUE`` lines:

  profiles = DIR            where profiles live (default /etc/imafs/profiles)
  default_profile = NAME    the profile of a container without org.imafs.profile
                            (default: none -- a namespace with no policy or keys of
                            its own; the host's rules still apply)
  archive = DIR | none      where poststop archives a namespace's list (default
                            /var/lib/imafs/archive)
  allow_host_paths = no|yes whether org.imafs.options may name host files
                            (policy=, keys=; default no)
  state_dir = DIR           where the hook remembers the namespaces it made
                            (default /run/imafs/oci-hook)
  remove_wait = SECONDS     how long poststop waits for a container's last
                            processes to leave (default 10)
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from imafs.ima import nsoptions
from imafs.ima.keys import CERT_SUFFIXES, Keyring, KeyringError, _split_pem
from imafs.ima.modelfile import ModelFileError, parse_model
from imafs.ima.nsoptions import OptionError
from imafs.ima.policy import MAX_POLICY_BYTES, PolicyError
from imafs.ima.policy_parse import parse_policy

DEFAULT_CONFIG = "/etc/imafs/oci-hook.conf"
DEFAULT_PROFILES = "/etc/imafs/profiles"
MAX_OPTIONS_BYTES = 64 * 1024
MAX_CERT_FILE = 1 << 20
MAX_CERT_FILES = 256
# a model file sent over the control socket: one request line, with room for the rest
MAX_MODEL_TEXT = 3 << 20


class ProfileError(Exception):
    """A refused profile, configuration or host file: one line saying which and why."""


@dataclass
class HostOptions:
    """What a host-side creator sends: value options, the policy's text and its
    source, the certificates (DER) and where they came from."""
    options: dict = field(default_factory=dict)
    policy: str | None = None
    policy_from: str = ""
    certs: list = field(default_factory=list)
    keys_from: str = ""
    model: str | None = None
    model_from: str = ""

    def merge(self, other: "HostOptions", other_name: str, mine: str) -> None:
        """Add ``other``'s options; an option both give is refused (neither wins
        silently)."""
        for k, v in other.options.items():
            if k in self.options and self.options[k] != v:
                raise ProfileError(f"{k}= is given by {mine} ({self.options[k]}) and by "
                                   f"{other_name} ({v})")
            self.options[k] = v
        if other.policy is not None:
            if self.policy is not None:
                raise ProfileError(f"a policy is given by {self.policy_from} and by "
                                   f"{other.policy_from}")
            self.policy, self.policy_from = other.policy, other.policy_from
        if other.keys_from:
            if self.keys_from:
                raise ProfileError(f"keys are given by {self.keys_from} and by "
                                   f"{other.keys_from}")
            self.certs, self.keys_from = other.certs, other.keys_from
        if other.model is not None:
            if self.model is not None:
                raise ProfileError(f"a model is given by {self.model_from} and by "
                                   f"{other.model_from}")
            self.model, self.model_from = other.model, other.model_from
        if self.model is not None and self.options.get("model") == "learn":
            raise ProfileError(f"model=learn and a model file ({self.model_from}): one or "
                               f"the other")


def _check_admin(path: str, st: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ProfileError(f"{what} {path} is a symbolic link: refused")
    if st.st_uid != 0:
        raise ProfileError(f"{what} {path} belongs to uid {st.st_uid}, not root: refused")
    if st.st_mode & 0o022:
        raise ProfileError(f"{what} {path} is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): refused")


def _read(path: str, limit: int, what: str, strict: bool) -> bytes:
    """A regular file's bytes (at most ``limit``); ``strict``: root's alone, no link."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if strict else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and strict:
            raise ProfileError(f"{what} {path} is a symbolic link: refused") from None
        raise ProfileError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProfileError(f"{what} {path} is not a regular file")
        if strict:
            _check_admin(path, st, what)
        if st.st_size > limit:
            raise ProfileError(f"{what} {path}: {st.st_size} bytes (at most {limit})")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise ProfileError(f"{what} {path}: over {limit} bytes")
        return data
    finally:
        os.close(fd)


def load_policy(path: str, *, strict: bool) -> str:
    """A host policy file's text, checked (line and column of the first bad rule)."""
    raw = _read(path, MAX_POLICY_BYTES, "policy", strict)
    try:
        parse_policy(raw)
    except PolicyError as e:
        raise ProfileError(f"policy {path}: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"policy {path}: not UTF-8 text") from None


def load_keys(path: str, *, strict: bool) -> list[bytes]:
    """The certificates of a host directory (*.der, *.pem, *.crt, *.x509, *.cer, PEM
    bundles split, a keygen directory's private-key PEM skipped), each checked as a
    namespace keyring checks it: the DER of each; ProfileError for an unusable one or
    a directory without any."""
    try:
        if strict:
            _check_admin(path, os.lstat(path), "keys directory")
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ProfileError(f"keys {path}: {e.strerror}") from None
    ring, out, files, seen = Keyring(), [], 0, set()
    for name in names:
        if not name.lower().endswith(CERT_SUFFIXES):
            continue
        files += 1
        if files > MAX_CERT_FILES:
            raise ProfileError(f"keys {path}: more than {MAX_CERT_FILES} certificate files")
        fp = os.path.join(path, name)
        data = _read(fp, MAX_CERT_FILE, "certificate", strict)
        for blob in _split_pem(data):
            if blob is None:
                break
            try:
                info = ring.add(blob)
            except KeyringError as e:
                raise ProfileError(f"key {fp} is unusable: {e}") from None
            if info.fingerprint not in seen:     # a keygen directory: .der and .pem
                seen.add(info.fingerprint)
                out.append(info.der)
    if not out:
        raise ProfileError(f"keys {path}: no certificate in it (*.der, *.pem, *.crt, ...)")
    return out


def load_model(path: str, *, strict: bool) -> str:
    """A host model file's text, checked as a load checks it (the line of the first
    error); at most MAX_MODEL_TEXT bytes: it goes in one control-socket request."""
    raw = _read(path, MAX_MODEL_TEXT, "model", strict)
    try:
        parse_model(raw)
    except ModelFileError as e:
        raise ProfileError(f"model {path}: {e}") from None
    return raw.decode("ascii")


def parse_option_words(words: list[str], *, host_files: bool, source: str,
                       strict: bool, host_paths: bool | None = None) -> HostOptions:
    """Grammar words -> HostOptions, the host files they name loaded (the host paths
    the daemon reads itself, ``evm_key=``, stay options)."""
    try:
        opts = nsoptions.parse_options(words, host_files=host_files, host_paths=host_paths,
                                       source=source)
    except OptionError as e:
        raise ProfileError(str(e)) from None
    out = HostOptions()
    for k, v in opts.items():
        if k == "policy":
            out.policy, out.policy_from = load_policy(v, strict=strict), f"policy={v}"
        elif k == "keys":
            out.certs, out.keys_from = load_keys(v, strict=strict), f"keys={v}"
        elif k == "model" and v != "learn":
            if not host_files:
                raise ProfileError(f"{source}: model={v} names a host file, which only "
                                   f"a creator on the host gives (imafs ns create, an OCI "
                                   f"hook profile's model file)")
            out.model, out.model_from = load_model(v, strict=strict), f"model={v}"
        else:
            out.options[k] = v
    return out


def _option_lines(text: str) -> list[str]:
    words = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words.extend(line.split())
    return words


def load_profile(base: str, name: str) -> HostOptions:
    """Profile ``name`` of directory ``base``: its policy, keys and options, every
    part checked (module docstring)."""
    try:
        nsoptions.check_name(name)
    except OptionError:
        raise ProfileError(f"bad profile name {name!r} (letters, digits, '.', '_', '-')") \
            from None
    try:
        _check_admin(base, os.lstat(base), "profiles directory")
    except FileNotFoundError:
        raise ProfileError(f"profiles directory {base} does not exist") from None
    d = os.path.join(base, name)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise ProfileError(f"no profile {name!r} (no directory {d})") from None
    _check_admin(d, st, "profile")
    if not stat.S_ISDIR(st.st_mode):
        raise ProfileError(f"profile {d} is not a directory")
    out = HostOptions()
    opath = os.path.join(d, "options")
    if os.path.lexists(opath):
        raw = _read(opath, MAX_OPTIONS_BYTES, "profile options", True)
        try:
            words = _option_lines(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProfileError(f"profile options {opath}: not UTF-8 text") from None
        for w in words:
            k = w.partition("=")[0]
            if k in nsoptions.HOST_FILE_OPTIONS or (k == "model" and w != "model=learn"):
                raise ProfileError(f"profile options {opath}: {k}= is the profile's own "
                                   f"{k} {'directory' if k == 'keys' else 'file'}, not an "
                                   f"option")
        out = parse_option_words(words, host_files=False, host_paths=True,
                                 source=f"profile {name} options", strict=True)
    ppath = os.path.join(d, "policy")
    if os.path.lexists(ppath):
        out.policy, out.policy_from = load_policy(ppath, strict=True), f"profile {name}"
    kpath = os.path.join(d, "keys")
    if os.path.lexists(kpath):
        out.certs, out.keys_from = load_keys(kpath, strict=True), f"profile {name}"
    mpath = os.path.join(d, "model")
    if os.path.lexists(mpath):
        if out.options.get("model") == "learn":
            raise ProfileError(f"profile {name}: model=learn and a model file: one or the "
                               f"other")
        out.model, out.model_from = load_model(mpath, strict=True), f"profile {name}"
    return out


@dataclass
class HookConfig:
    profiles: str = DEFAULT_PROFILES
    default_profile: str | None = None
    archive: str | None = "/var/lib/imafs/archive"
    allow_host_paths: bool = False
    state_dir: str = "/run/imafs/oci-hook"
    remove_wait: float = 10.0
    source: str = "defaults"


_BOOL = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


def load_config(path: str | None = None) -> HookConfig:
    """The hook's configuration (module docstring); defaults when the default file
    does not exist, ProfileError for a file named explicitly that does not."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    cfg = HookConfig()
    if not explicit and not os.path.lexists(path):
        return cfg
    raw = _read(path, MAX_OPTIONS_BYTES, "hook configuration", True)
    cfg.source = path
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"hook configuration {path}: not UTF-8 text") from None
    seen = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = (p.strip() for p in line.partition("="))
        where = f"hook configuration {path}, line {n}"
        if not eq or not value:
            raise ProfileError(f"{where}: expected KEY = VALUE")
        if key in seen:
            raise ProfileError(f"{where}: {key} given twice")
        seen.add(key)
        if key in ("profiles", "state_dir"):
            if not value.startswith("/"):
                raise ProfileError(f"{where}: {key} must be an absolute path")
            setattr(cfg, key, value)
        elif key == "archive":
            if value != "none" and not value.startswith("/"):
                raise ProfileError(f"{where}: archive must be an absolute path or none")
            cfg.archive = None if value == "none" else value
        elif key == "default_profile":
            cfg.default_profile = None if value == "none" else value
        elif key == "allow_host_paths":
            if value.lower() not in _BOOL:
                raise ProfileError(f"{where}: allow_host_paths is yes or no")
            cfg.allow_host_paths = _BOOL[value.lower()]
        elif key == "remove_wait":
            try:
                cfg.remove_wait = float(value)
                if not 0 <= cfg.remove_wait <= 600:
                    raise ValueError
            except ValueError:
                raise ProfileError(f"{where}: remove_wait is seconds, 0-600") from None
        else:
            raise ProfileError(f"{where}: unknown setting {key!r} (profiles, "
                               f"default_profile, archive, allow_host_paths, state_dir, "
                               f"remove_wait)")
    return cfg
