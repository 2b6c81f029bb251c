"""keylime's running services attesting an imafs mount, on loopback.

What a fleet runs, on one machine: keylime's verifier, registrar and tenant (the
7.x servers of the main venv, PyPI ``keylime``) and keylime's Python agent (6.6.0,
the last release that has one, in ``.venv-keylime-agent``, made by
``scripts/lib/setup.sh``), with Debian's swtpm as the TPM.  The agent runs in a
private mount namespace whose ``/sys/kernel/security`` is a tmpfs carrying
``ima/ascii_runtime_measurements`` bind-mounted from the mount's
``.imafs/ascii_runtime_measurements``: the agent reads imafs's list where it reads
the kernel's.  ``imafs mount --tpm`` extends the same swtpm's PCR 10, so the
agent's quotes cover imafs's list.

:class:`KeylimeLoop` starts, in order: swtpm (state made by ``swtpm_setup`` with an
EK certificate from a local CA made for the run), the configuration files
(keylime's own templates, from the sdists ``setup.sh`` keeps, through
``keylime_upgrade_config --defaults``; then the few options below changed), the
verifier (it makes keylime's mTLS CA), the registrar, the agent; ``add()`` runs
the tenant.  Every port is a free loopback port; every file lives in one work
directory.  ``close()`` stops all of it, also after a failure: each service runs in
a process group of its own, which gets SIGTERM, then SIGKILL (the 7.x servers'
parent processes ignore SIGTERM while their workers live).  The agent's mounts live
and die with its mount namespace, so none is left behind.

Adaptation (one relay, for the 6.6 agent against 7.14 servers):

The agent reaches the registrar through :class:`_RegistrarRelay`, a loopback relay
that changes two things the 7.12+ registrar (rewritten on a new web framework)
reads differently from the 6.6 agent's requests, and passes everything else through:

* The 6.6 agent posts its registration and activation without a ``Content-Type``
  header; the registrar then reads no JSON parameters and answers 400 ("aik_tpm is
  required").  The relay adds ``Content-Type: application/json``.
* A 6.6 agent whose TPM has an EK certificate sends the certificate and no
  ``ek_tpm``: registrars up to 7.11 derived the EK's public area from the
  certificate, 7.12+ require ``ek_tpm`` ("is required in absence of an IAK and
  IDevID").  The relay adds it, made from the certificate's key by keylime's own
  ``tpm2_objects.ek_low_tpm2b_public_from_pubkey`` (the standard EK template, the
  one ``tpm2_createek`` and the agent use).

keylime 7.10.0 (the last release before that rewrite) takes the 6.6 agent as it
is; it is not used because its ``process_measurement_list`` (and 7.12.1's) needs an
attestation state object, which the suite's other keylime checks
(``scripts/keylime_check.py`` included) do not pass, and the main venv holds one
keylime.

Not adaptations, configuration: the agent's EK certificate comes from swtpm's
local CA (``swtpm_setup --create-ek-cert``), so the 6.6 agent sends a real
certificate instead of ``ekcert="emulator"`` (which 7.14's registrar refuses) and
the tenant checks it against that CA (``require_ek_cert`` stays on, the CA's
issuer certificate is the tenant's ``tpm_cert_store``).  The agent runs as root
with a fixed ``tpm_ownerpassword`` and without revocation notifications; keylime
imports ``gpg`` (Debian's python3-gpg, not installable from PyPI without
building), which each service finds on its PYTHONPATH.

``keylime_demo.py`` beside this module is ``scripts/demo``'s keylime step.
"""
from __future__ import annotations

import configparser
import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
AGENT_VENV = Path(os.environ.get("IMAFS_KEYLIME_AGENT_VENV", REPO / ".venv-keylime-agent"))
#: the servers: the keylime of the Python running this module (the main venv)
SERVER_BIN = Path(sys.prefix) / "bin"
DEBIAN_GPG = Path("/usr/lib/python3/dist-packages/gpg")
AGENT_UUID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
API = "v2.1"          # the 6.6 agent's API version, which 7.x still serves


class KeylimeError(RuntimeError):
    """A keylime service or tool did not do what the loop needs (with its log)."""


def missing() -> str | None:
    """Why the loop cannot run here (None: it can)."""
    for tool in ("swtpm", "swtpm_setup", "tpm2_startup", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (AGENT_VENV / "bin" / "keylime_agent").exists():
        return (f"no keylime agent in {AGENT_VENV} (made by scripts/lib/setup.sh: "
                f"imafs_keylime_agent)")
    if not (SERVER_BIN / "keylime_verifier").exists():
        return f"no keylime_verifier in {SERVER_BIN} (the test extra of pyproject.toml)"
    if not DEBIAN_GPG.is_dir():
        return "Debian's python3-gpg is not installed (keylime imports gpg)"
    for which in ("agent", "server"):
        if _templates(which) is None:
            return f"keylime's configuration templates ({which}) are missing in {AGENT_VENV}/share"
    return None


def _templates(which: str) -> Path | None:
    """keylime's configuration templates (from its sdist, kept by setup.sh) for the
    agent's version or the servers' (the main venv's keylime)."""
    if which == "agent":
        version = (AGENT_VENV / "share" / "keylime-agent-version").read_text().strip() \
            if (AGENT_VENV / "share" / "keylime-agent-version").exists() else "6.6.0"
    else:
        from importlib import metadata
        try:
            version = metadata.version("keylime")
        except metadata.PackageNotFoundError:
            return None
    t = AGENT_VENV / "share" / f"keylime-{version}" / "templates"
    return t if t.is_dir() else None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair() -> int:
    """P with P and P+1 free (swtpm's server and control ports)."""
    for _ in range(200):
        port = free_ports(1)[0]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise KeylimeError("no free port pair on 127.0.0.1")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _set_options(path: Path, section: str, **values) -> None:
    """Change options of one section of a keylime configuration file."""
    cp = configparser.RawConfigParser()
    cp.optionxform = str            # keylime's options are lower case; keep them as is
    cp.read(path)
    for k, v in values.items():
        if not cp.has_option(section, k):
            raise KeylimeError(f"{path}: keylime's template has no option {section}.{k}")
        cp.set(section, k, str(v))
    with open(path, "w") as f:
        cp.write(f)


class _Service:
    """One process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, cwd: Path):
        self.name, self.log = name, log
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        _stop_all([self], grace)

    def gone(self) -> bool:
        return self.proc.poll() is not None and not _group_alive(self.proc.pid)

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _stop_all(services: list[_Service], grace: float = 10.0) -> None:
    """SIGTERM to each service's process group (the whole group: the 7.x servers'
    parents ignore it while their workers live), SIGKILL to what is left after
    ``grace`` seconds; all groups at once."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [s for s in services if not s.gone()]
        for s in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, sig)     # a session leader's pid is its group's id
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [s for s in left if not s.gone()]
        if not left:
            break
    for s in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(1)
        s._out.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _with_ek_tpm(body: bytes) -> bytes:
    """A registration that carries an EK certificate and no ``ek_tpm`` gets the EK's
    public area made from the certificate's key, as keylime's registrar did itself
    up to 7.11 (with keylime's own function for the standard EK template); any other
    body is returned unchanged."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    cert = data.get("ekcert") if isinstance(data, dict) else None
    if not cert or cert == "emulator" or data.get("ek_tpm"):
        return body
    import base64
    from cryptography import x509
    from keylime.tpm import tpm2_objects
    key = x509.load_der_x509_certificate(base64.b64decode(cert)).public_key()
    data["ek_tpm"] = base64.b64encode(tpm2_objects.ek_low_tpm2b_public_from_pubkey(key)).decode()
    return json.dumps(data).encode()


class _RegistrarRelay:
    """Loopback relay in front of the registrar's plain-HTTP port for the 6.6 agent
    (see the module's docstring): a request with a body and no Content-Type gets
    ``application/json``, a registration with an EK certificate its ``ek_tpm``;
    nothing else is changed."""

    def __init__(self, target_port: int):
        target = target_port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                if body and "content-type" not in {k.lower() for k in headers}:
                    headers["Content-Type"] = "application/json"
                if self.command == "POST":
                    body = _with_ek_tpm(body)
                    headers["Content-Length"] = str(len(body))
                c = http.client.HTTPConnection("127.0.0.1", target, timeout=60)
                try:
                    c.request(self.command, self.path, body=body or None, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                finally:
                    c.close()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _relay

            def log_message(self, *args):     # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class KeylimeLoop:
    """swtpm, keylime's verifier, registrar, agent and tenant in ``work``.

    Use: ``start_tpm()`` (then mount imafs with ``--tpm loop.tcti``),
    ``start_servers()``, ``start_agent(mnt)``, ``add(policy)``; ``status()``,
    ``wait_pass(rounds)``, ``wait_fail()``; ``close()`` (or ``with``)."""

    def __init__(self, work: Path, *, quote_interval: float = 1.0,
                 log: Callable[[str], None] | None = None):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.quote_interval = quote_interval
        self.say = log or (lambda msg: None)
        self.services: dict[str, _Service] = {}
        self.relay: _RegistrarRelay | None = None
        self._mark = 0
        # the 7.14 verifier makes /run/keylime for a socket: removed again if it was
        # not there before and is empty at the end
        self._run_keylime = not os.path.exists("/run/keylime")
        self.tcti: str | None = None
        self.uuid = AGENT_UUID
        self.server_dir = self.work / "keylime"          # KEYLIME_DIR of the servers
        self.agent_dir = self.work / "agent"              # KEYLIME_DIR of the agent
        self.etc = self.work / "etc"
        self.pylib = self.work / "pylib"                  # just Debian's gpg module
        for d in (self.server_dir, self.agent_dir, self.etc, self.pylib):
            d.mkdir(exist_ok=True)
        if not (self.pylib / "gpg").exists():
            (self.pylib / "gpg").symlink_to(DEBIAN_GPG)
        (self.verifier_port, self.registrar_port, self.registrar_tls_port,
         self.agent_port, self.zmq_port) = free_ports(5)

    # ------------------------------------------------------------------ plumbing
    def _env(self, keylime_dir: Path, **confs: Path) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KEYLIME") and k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(KEYLIME_DIR=str(keylime_dir), PYTHONPATH=str(self.pylib),
                   KEYLIME_LOGGING_CONFIG=str(self.etc / "logging.conf"))
        for comp, path in confs.items():
            env[f"KEYLIME_{comp.upper()}_CONFIG"] = str(path)
        if self.tcti:
            env["TPM2TOOLS_TCTI"] = self.tcti
        env.setdefault("TSS2_LOG", "all+NONE")
        return env

    def _start(self, name: str, argv: list[str], env: dict, cwd: Path) -> _Service:
        s = _Service(name, argv, env, self.work / f"{name}.log", cwd)
        self.services[name] = s
        return s

    def _wait(self, what: str, ok: Callable[[], bool], timeout: float,
              service: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if service and not self.services[service].alive():
                raise KeylimeError(f"{service} exited while waiting for {what}:\n"
                                   f"{self.services[service].tail()}")
            time.sleep(0.1)
        tail = f":\n{self.services[service].tail()}" if service else ""
        raise KeylimeError(f"timed out ({timeout:.0f} s) waiting for {what}{tail}")

    def _run(self, argv: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=env, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout)

    # ------------------------------------------------------------------ the TPM
    def start_tpm(self) -> str:
        """swtpm with an EK certificate from a CA of this run; returns its TCTI."""
        ca, state = self.work / "swtpm-localca", self.work / "swtpm-state"
        ca.mkdir(exist_ok=True)
        state.mkdir(exist_ok=True)
        (self.work / "swtpm-localca.conf").write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
            f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n")
        (self.work / "swtpm-localca.options").write_text(
            "--platform-manufacturer imafs\n--platform-version 2.1\n--platform-model test\n")
        (self.work / "swtpm_setup.conf").write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {self.work}/swtpm-localca.conf\n"
            f"create_certs_tool_options = {self.work}/swtpm-localca.options\n")
        r = self._run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
                       "--pcr-banks", "sha1,sha256", "--config",
                       str(self.work / "swtpm_setup.conf")], os.environ.copy(), timeout=60)
        if r.returncode != 0:
            raise KeylimeError(f"swtpm_setup failed: {r.stdout}{r.stderr}")
        port = _free_port_pair()
        self._start("swtpm", ["swtpm", "socket", "--tpm2",
                              "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                              "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                              "--flags", "not-need-init,startup-clear",
                              "--tpmstate", f"dir={state}"], os.environ.copy(), self.work)
        self._wait("swtpm", lambda: _listening(port), 10, "swtpm")
        self.tcti = f"swtpm:host=127.0.0.1,port={port}"
        # the tenant trusts EK certificates that CA issued
        store = self.work / "tpm_cert_store"
        store.mkdir(exist_ok=True)
        shutil.copy(ca / "issuercert.pem", store / "swtpm-localca-issuer.pem")
        self.say(f"swtpm on {self.tcti} (EK certificate from a local CA)")
        return self.tcti

    # ------------------------------------------------------------------ configs
    def _configs(self) -> None:
        up = str(SERVER_BIN / "keylime_upgrade_config")
        env = self._env(self.server_dir)
        for which, out in (("server", self.etc), ("agent", self.etc / "agent")):
            out.mkdir(exist_ok=True)
            argv = [up, "--defaults", "--templates", str(_templates(which)), "--out", str(out)]
            if which == "agent":
                argv += ["--component", "agent"]
            r = self._run(argv, env)
            if r.returncode != 0:
                raise KeylimeError(f"keylime_upgrade_config failed: {r.stdout}{r.stderr}")
        db = f"sqlite:///{self.server_dir}/%s.sqlite"
        lo = "127.0.0.1"
        _set_options(self.etc / "verifier.conf", "verifier", ip=lo, port=self.verifier_port,
                     registrar_ip=lo, registrar_port=self.registrar_tls_port,
                     tls_dir="generate", database_url=db % "cv_data", num_workers=1,
                     quote_interval=self.quote_interval, retry_interval=1, max_retries=3,
                     request_timeout=30)
        _set_options(self.etc / "verifier.conf", "revocations",
                     enabled_revocation_notifications="[]", zmq_port=self.zmq_port)
        _set_options(self.etc / "registrar.conf", "registrar", ip=lo, port=self.registrar_port,
                     tls_port=self.registrar_tls_port, tls_dir="default",
                     database_url=db % "reg_data")
        _set_options(self.etc / "tenant.conf", "tenant", verifier_ip=lo,
                     verifier_port=self.verifier_port, registrar_ip=lo,
                     registrar_port=self.registrar_tls_port,
                     tpm_cert_store=self.work / "tpm_cert_store", require_ek_cert=True,
                     retry_interval=1, max_retries=5, request_timeout=30)
        q = lambda v: f'"{v}"'     # the agent's template quotes its strings  # noqa: E731
        _set_options(self.etc / "agent" / "agent.conf", "agent", uuid=q(self.uuid), ip=q(lo),
                     port=self.agent_port, contact_ip=q(lo), contact_port=self.agent_port,
                     registrar_ip=q(lo), registrar_port=self.relay.port,
                     tpm_ownerpassword=q("keylime"), run_as=q(""),
                     enable_revocation_notifications="false",
                     revocation_notification_port=self.zmq_port,
                     tpm_hash_alg=q("sha256"), retry_interval=1)

    # ------------------------------------------------------------------ servers
    def start_servers(self) -> None:
        """Verifier (it generates keylime's CA), registrar, the registration relay."""
        self.relay = _RegistrarRelay(self.registrar_port)
        self._configs()
        env = self._env(self.server_dir, verifier=self.etc / "verifier.conf",
                        registrar=self.etc / "registrar.conf", tenant=self.etc / "tenant.conf",
                        ca=self.etc / "ca.conf")
        self.server_env = env
        ca = self.server_dir / "cv_ca"
        self._start("verifier", [str(SERVER_BIN / "keylime_verifier")], env, self.server_dir)
        # the registrar uses the CA the verifier makes: start it as soon as that
        # exists (both import keylime for seconds; let them overlap)
        self._wait("the verifier's CA", lambda: (ca / "client-private.pem").exists(), 60,
                   "verifier")
        self._start("registrar", [str(SERVER_BIN / "keylime_registrar")], env, self.server_dir)
        self._wait("the verifier", lambda: _listening(self.verifier_port), 60, "verifier")
        self._wait("the registrar", lambda: _listening(self.registrar_tls_port), 60, "registrar")
        self._wait("the registrar", lambda: _listening(self.registrar_port), 10, "registrar")
        self.tls = {"cert": (str(ca / "client-cert.crt"), str(ca / "client-private.pem")),
                    "verify": str(ca / "cacert.crt")}
        self.say(f"verifier on 127.0.0.1:{self.verifier_port}, registrar on "
                 f"127.0.0.1:{self.registrar_port} (TLS {self.registrar_tls_port})")

    def _get(self, port: int, path: str, method: str = "GET") -> tuple[int, dict]:
        """A request to a server's REST API with the tenant's client certificate."""
        import requests
        r = requests.request(method, f"https://127.0.0.1:{port}/{API}/{path}",
                             cert=self.tls["cert"], verify=self.tls["verify"], timeout=30)
        try:
            body = r.json()
        except ValueError:
            body = {"text": r.text}
        return r.status_code, body

    # ------------------------------------------------------------------ agent
    def start_agent(self, mnt: Path, control: str = ".imafs") -> None:
        """keylime's agent in a private mount namespace that shows the mount's list
        as the kernel's; waits until the registrar has it (registered and
        activated)."""
        ml = Path(mnt) / control / "ascii_runtime_measurements"
        if not ml.exists():
            raise KeylimeError(f"{ml} not found (not an imafs mount with integrity?)")
        # the agent trusts the verifier's CA as the template's "default" says: the
        # cacert.crt of cv_ca in its own KEYLIME_DIR
        (self.agent_dir / "cv_ca").mkdir(exist_ok=True)
        shutil.copy(self.server_dir / "cv_ca" / "cacert.crt",
                    self.agent_dir / "cv_ca" / "cacert.crt")
        script = ('set -e; mount --make-rprivate /; '
                  'mount -t tmpfs -o size=1m,mode=0755 imafs-securityfs /sys/kernel/security; '
                  'mkdir /sys/kernel/security/ima; '
                  ': > /sys/kernel/security/ima/ascii_runtime_measurements; '
                  'mount --bind "$1" /sys/kernel/security/ima/ascii_runtime_measurements; '
                  'shift; exec "$@"')
        env = self._env(self.agent_dir, agent=self.etc / "agent" / "agent.conf")
        self._start("agent", ["unshare", "--mount", "--", "sh", "-c", script, "sh", str(ml),
                              str(AGENT_VENV / "bin" / "keylime_agent")], env, self.agent_dir)
        self._wait("the agent's registration", self.registered, 120, "agent")
        self._wait("the agent's server", lambda: _listening(self.agent_port), 30, "agent")
        self.say(f"agent {self.uuid} registered (its list: {ml})")

    def registered(self) -> bool:
        code, body = self._get(self.registrar_tls_port, f"agents/{self.uuid}")
        return code == 200          # the registrar shows activated agents only

    def registration(self) -> dict:
        """The registrar's record of the agent (ek_tpm, ekcert, aik_tpm, ...)."""
        code, body = self._get(self.registrar_tls_port, f"agents/{self.uuid}")
        if code != 200:
            raise KeylimeError(f"registrar: GET agents/{self.uuid}: {code} {body}")
        return body.get("results") or {}

    # ------------------------------------------------------------------ tenant
    def tenant(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return self._run([str(SERVER_BIN / "keylime_tenant"), *args], self.server_env,
                         timeout=timeout)

    def add(self, policy: Path) -> None:
        """``keylime_tenant -c add`` with a runtime policy; waits for the first PASS."""
        self._mark = self.services["verifier"].log.stat().st_size
        r = self.tenant("-c", "add", "-t", "127.0.0.1", "-tp", str(self.agent_port),
                        "-u", self.uuid, "--runtime-policy", str(policy))
        if r.returncode != 0:
            raise KeylimeError(f"keylime_tenant -c add failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}{r.stderr[-3000:]}\n"
                               f"agent:\n{self.services['agent'].tail()}")
        self.wait_pass(1)

    def known(self) -> bool:
        """Does the verifier have the agent (added, whatever its state)?"""
        return self._get(self.verifier_port, f"agents/{self.uuid}")[0] == 200

    def delete(self) -> None:
        """The verifier forgets the agent: the DELETE that ``keylime_tenant -c delete``
        sends, without the seconds the tenant takes to start."""
        code, body = self._get(self.verifier_port, f"agents/{self.uuid}", "DELETE")
        if code not in (200, 202, 404):
            raise KeylimeError(f"verifier: DELETE agents/{self.uuid}: {code} {body}")
        self._wait("the verifier to drop the agent", lambda: not self.known(), 60)

    # ------------------------------------------------------------------ verdicts
    def status(self) -> dict:
        """The verifier's record of the agent: attestation_status (PASS, FAIL,
        PENDING), attestation_count, last_event_id, operational_state, ..."""
        code, body = self._get(self.verifier_port, f"agents/{self.uuid}")
        if code != 200:
            raise KeylimeError(f"verifier: GET agents/{self.uuid}: {code} {body}")
        return body.get("results") or {}

    def wait_pass(self, rounds: int, timeout: float | None = None) -> dict:
        """Wait for ``rounds`` more successful attestations; FAIL on the way raises."""
        start = self.status().get("attestation_count") or 0
        timeout = timeout or 30 + rounds * self.quote_interval * 4
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st.get("attestation_status") == "FAIL":
                raise KeylimeError(f"the verifier failed the agent: {self.failure(st)}")
            if (st.get("attestation_count") or 0) >= start + rounds:
                return st
            if time.monotonic() > deadline:
                raise KeylimeError(f"timed out waiting for {rounds} attestation(s): {st}\n"
                                   f"{self.services['verifier'].tail()}")
            time.sleep(0.1)

    def wait_fail(self, timeout: float) -> tuple[dict, float]:
        """Wait until the verifier reports FAIL; (its record, seconds it took)."""
        t0 = time.monotonic()
        while True:
            st = self.status()
            if st.get("attestation_status") == "FAIL":
                return st, time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise KeylimeError(f"no FAIL within {timeout:.1f} s: {st}")
            time.sleep(0.05)

    def verifier_log(self) -> str:
        """What the verifier logged since the last ``add()``."""
        with open(self.services["verifier"].log, "rb") as f:
            f.seek(self._mark)
            return f.read().decode(errors="replace")

    def failure(self, st: dict | None = None) -> str:
        """The failure as the verifier reports it: its last_event_id, state, and the
        warnings and errors it logged since the last ``add()``."""
        st = st or self.status()
        lines = [ln.split(" - ", 3)[-1] for ln in self.verifier_log().splitlines()
                 if (" - WARNING - " in ln or " - ERROR - " in ln)
                 and " - keylime.web - " not in ln]      # not its "Sent 404" lines
        return f"{st.get('last_event_id')} (state {st.get('operational_state')}): " + \
            " | ".join(lines[-8:])

    # ------------------------------------------------------------------ stop
    def stop_agent(self) -> None:
        s = self.services.pop("agent", None)
        if s is not None:
            with contextlib.suppress(Exception):
                s.stop()

    def close(self) -> None:
        """Stop everything this object started, agent first (it holds a copy of the
        imafs mount in its namespace), swtpm last; never raises."""
        self.stop_agent()
        pids = [s.proc.pid for s in self.services.values()]
        with contextlib.suppress(Exception):
            _stop_all(list(self.services.values()))
        self.services.clear()
        for pid in pids:        # a server killed before it removed its socket
            with contextlib.suppress(OSError):
                os.unlink(f"/run/keylime/shared_data.{pid}.sock")
        if self.relay is not None:
            with contextlib.suppress(Exception):
                self.relay.stop()
            self.relay = None
        if self._run_keylime:
            with contextlib.suppress(OSError):
                os.rmdir("/run/keylime")

    def __enter__(self) -> "KeylimeLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

