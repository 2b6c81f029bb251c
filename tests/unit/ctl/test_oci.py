"""imafs.ctl.oci: the OCI hook's input (the runtime's state JSON, the bundle's root)
and its refusals before it reaches any daemon. The hook against real runc and mounts:
tests/interop/test_runc.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imafs.ctl import oci
from imafs.ctl.profiles import HookConfig

STATE = {"ociVersion": "1.0.2", "id": "web", "status": "creating", "pid": 4242,
         "bundle": "/srv/bundle", "annotations": {"org.imafs.profile": "web"}}


def js(**kw) -> bytes:
    d = dict(STATE)
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not None}).encode()


def test_state_parses():
    st = oci.parse_state(js())
    assert (st.id, st.status, st.pid, st.bundle) == ("web", "creating", 4242, "/srv/bundle")
    assert st.annotations == {"org.imafs.profile": "web"} and st.has_annotations
    st = oci.parse_state(js(status="stopped", pid=None, annotations=None))
    assert st.pid == 0 and not st.has_annotations


@pytest.mark.parametrize("data,why", [
    (b"", "no container state on stdin"),
    (b"{", "not JSON"),
    (b"[]", "not a JSON object"),
    (js(id=None), "has no 'id'"),
    (js(pid="4242"), "'pid' is not a number"),
    (js(pid=True), "'pid' is not a number"),
    (js(bundle="relative"), "not an absolute path"),
    (js(id="a/b"), "is not an OCI container id"),
    (js(id=".."), "is not an OCI container id"),
    (js(annotations={"a": 1}), "annotations are not strings"),
    (b" " * (oci.MAX_STATE + 1), "over"),
])
def test_bad_states(data, why):
    with pytest.raises(oci.HookError) as e:
        oci.parse_state(data)
    assert why in str(e.value)


def test_root_must_be_an_imafs_mount(tmp_path):
    (tmp_path / "rootfs").mkdir()
    cfg = {"root": {"path": "rootfs"}}
    with pytest.raises(oci.HookError) as e:
        oci.container_root(str(tmp_path), cfg)
    assert f"the container's root {tmp_path}/rootfs is not a mount point" in str(e.value)
    with pytest.raises(oci.HookError) as e:
        oci.container_root(str(tmp_path), {"root": {}})
    assert "has no root.path" in str(e.value)
    with pytest.raises(oci.HookError) as e:
        oci.container_root(str(tmp_path), {"root": {"path": "/proc"}})
    assert "is a proc mount, not an imafs mount" in str(e.value)


def test_bundle_config_refusals(tmp_path):
    with pytest.raises(oci.HookError) as e:
        oci.bundle_config(str(tmp_path))
    assert "config.json: No such file" in str(e.value)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(oci.HookError) as e:
        oci.bundle_config(str(tmp_path))
    assert "not a JSON object" in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root")
def test_stages_and_statuses(tmp_path):
    cfg = HookConfig(state_dir=str(tmp_path / "state"))
    with pytest.raises(oci.HookError) as e:
        oci.run(js(status="running"), cfg)
    assert "belongs in the createRuntime (or prestart) and poststop hooks" in str(e.value)
    with pytest.raises(oci.HookError) as e:
        oci.run(js(), cfg, stage="poststop")
    assert "stage poststop but the container is 'creating'" in str(e.value)
    with pytest.raises(oci.HookError) as e:
        oci.run(js(), cfg, stage="startContainer")
    assert "runs in createRuntime, prestart, poststop" in str(e.value)
    with pytest.raises(oci.HookError) as e:
        oci.run(js(pid=None), cfg)
    assert "no pid of the container's init" in str(e.value)
    # poststop of a container the hook made nothing for: nothing to do
    assert oci.run(js(status="stopped", pid=None), cfg) is None


def test_a_rootless_hook_is_told_why():
    """A hook run by a non-root runtime (rootless) gets one clear line, not a socket
    error; root of a user namespace too."""
    code = ("import sys; from imafs.cli import main; sys.exit(main(['oci-hook']))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if os.geteuid() == 0:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", code], input=js(), capture_output=True,
                           env=env)
        assert r.returncode == 2
        assert b"imafs oci-hook: imafs oci-hook runs as uid 65534, not root" in r.stderr
        assert b"rootless runtime" in r.stderr and r.stderr.count(b"\n") == 1
        r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c",
                            code], input=js(), capture_output=True, env=env)
        assert r.returncode == 2, r.stderr
        assert b"runs as root of a user namespace" in r.stderr


class _FakeClient:
    """What Client.for_mount returns, answering ns-create as told."""

    def __init__(self, answer):
        self.answer, self.info, self.calls = answer, {"state": "/s"}, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, op, **kw):
        self.calls.append((op, kw))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root")
@pytest.mark.parametrize("answer,kept", [
    (oci.CtlError("namespace /web exists", "EEXIST"), False),     # refused: nothing made
    (oci.CtlError("ns-create: the daemon did not answer in time"), True),   # unknown
])
def test_the_hooks_state_after_a_failed_creation(tmp_path, monkeypatch, answer, kept):
    """A refusal leaves no hook state (its poststop touches nothing); a creation the
    daemon did not answer keeps the provisional state, so poststop removes by name
    whatever was made."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"root": {"path": "/x"}}')
    monkeypatch.setattr(oci, "container_root", lambda bundle, cfg: "/x")
    fake = _FakeClient(answer)
    monkeypatch.setattr(oci.Client, "for_mount", classmethod(lambda cls, m, state=None: fake))
    cfg = HookConfig(state_dir=str(tmp_path / "state"), archive=None)
    st = js(pid=os.getpid(), bundle=str(tmp_path / "b"), annotations={})
    with pytest.raises(oci.HookError):
        oci.run(st, cfg)
    left = list((tmp_path / "state").iterdir())
    assert len(left) == (1 if kept else 0)
    if kept:
        rec = json.loads(left[0].read_text())
        assert rec["name"] == "web" and rec["uuid"] is None
        fake.answer = {"ok": True, "namespace": {"name": "web"}}
        assert oci.run(js(status="stopped", pid=None, bundle=str(tmp_path / "b")), cfg) \
            == {"name": "web"}
        assert fake.calls[-1] == ("ns-remove", {"name": "web", "uuid": None, "fds": None})
        assert not list((tmp_path / "state").iterdir())


def test_annotation_model_is_the_model_word(tmp_path):
    """org.imafs.model: learn, or a host model file (host paths only where the
    configuration allows them); not with a model= word in org.imafs.options."""
    from imafs.ima import model as M
    from imafs.ima.modelfile import format_model
    text = format_model(M.Model().export()).decode()
    (tmp_path / "m.model").write_text(text)
    st = oci.parse_state(js(annotations={"org.imafs.model": "learn"}))
    opts, _ = oci.host_options(st, HookConfig())
    assert opts.options == {"model": "learn"}
    st = oci.parse_state(js(annotations={"org.imafs.model": str(tmp_path / "m.model")}))
    with pytest.raises(oci.HookError) as e:
        oci.host_options(st, HookConfig())
    assert "names a host file" in str(e.value) and "allow_host_paths" in str(e.value)
    opts, _ = oci.host_options(st, HookConfig(allow_host_paths=True))
    assert opts.model == text
    st = oci.parse_state(js(annotations={"org.imafs.model": "learn",
                                         "org.imafs.options": "model=learn"}))
    with pytest.raises(oci.HookError) as e:
        oci.host_options(st, HookConfig())
    assert "org.imafs.model" in str(e.value)
