"""imafs.ctl.profiles: profiles (admin-owned), the OCI hook's configuration, and host
files loaded into what a control-socket request carries. Runs as root (ownership is
what is checked)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from imafs.ctl import profiles as pr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
POLICY = "measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    from imafs.cli import main
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(d), "--type", "ec"]) == 0
    return d


@pytest.fixture
def base(tmp_path, keys) -> Path:
    b = tmp_path / "profiles"
    p = b / "web"
    (p / "keys").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    (p / "policy").write_text(POLICY)
    (p / "options").write_text("# web containers\nappraise=log\n\ntemplate=ima-sig\n")
    (p / "keys" / "web.der").write_bytes((keys / "signing_cert.der").read_bytes())
    for d in (b, p, p / "keys"):
        os.chmod(d, 0o755)
    return b


def test_a_profile_loads_whole(base, keys):
    o = pr.load_profile(str(base), "web")
    assert o.policy == POLICY and o.options == {"appraise": "log", "template": "ima-sig"}
    assert o.certs == [(keys / "signing_cert.der").read_bytes()]
    assert o.policy_from == o.keys_from == "profile web"


def test_a_profile_may_have_nothing(base):
    (base / "empty").mkdir(mode=0o755)
    o = pr.load_profile(str(base), "empty")
    assert (o.policy, o.certs, o.options) == (None, [], {})


@pytest.mark.parametrize("spoil,why", [
    (lambda p: os.chmod(p, 0o775), "writable by group or others"),
    (lambda p: os.chown(p, 65534, -1), "belongs to uid 65534"),
    (lambda p: os.chmod(p / "policy", 0o666), "writable by group or others"),
    (lambda p: os.chown(p / "options", 65534, -1), "belongs to uid 65534"),
    (lambda p: os.chmod(p / "keys", 0o777), "writable by group or others"),
    (lambda p: os.chown(p / "keys" / "web.der", 65534, -1), "belongs to uid 65534"),
    (lambda p: (os.unlink(p / "policy"), os.symlink("/etc/passwd", p / "policy")),
     "is a symbolic link"),
    (lambda p: os.chmod(p.parent, 0o777), "profiles directory"),
    (lambda p: (p / "policy").write_text("measure func=NOPE\n"), "line 1, column 9"),
    (lambda p: (p / "keys" / "web.der").write_bytes(b"0\x82\x00\x10not a certificate"),
     "is unusable"),
    (lambda p: (p / "keys" / "web.der").unlink(), "no certificate in it"),
    (lambda p: (p / "options").write_text("policy=/etc/shadow\n"),
     "is the profile's own policy file"),
    (lambda p: (p / "options").write_text("appraise=sometimes\n"), "appraise=: "),
    (lambda p: (p / "options").write_text("quota=3\n"), "expected KIND:ENTRIES"),
    (lambda p: (p / "options").write_text("digest_lists=/x\n"), "not built yet"),
])
def test_spoilt_profiles_are_refused(base, spoil, why):
    spoil(base / "web")
    with pytest.raises(pr.ProfileError) as e:
        pr.load_profile(str(base), "web")
    assert why in str(e.value)


@pytest.mark.parametrize("name", ["../web", "nope", "", "a/b"])
def test_unknown_or_bad_profile_names(base, name):
    with pytest.raises(pr.ProfileError) as e:
        pr.load_profile(str(base), name)
    assert "profile" in str(e.value)


def test_host_words_load_their_files(tmp_path, keys):
    (tmp_path / "p").write_text(POLICY)
    o = pr.parse_option_words([f"policy={tmp_path / 'p'}", f"keys={keys}", "hash=sha512"],
                              host_files=True, source="cli", strict=False)
    assert o.policy == POLICY and len(o.certs) == 1 and o.options == {"hash": "sha512"}
    with pytest.raises(pr.ProfileError) as e:
        pr.parse_option_words([f"policy={tmp_path / 'p'}"], host_files=False,
                              source="annotation org.imafs.options", strict=True)
    assert "names a host file" in str(e.value)


def test_merging_refuses_what_two_sources_give(base, tmp_path):
    o = pr.load_profile(str(base), "web")
    o.merge(pr.HostOptions(options={"appraise": "log"}), "annotation", "profile web")  # same
    with pytest.raises(pr.ProfileError) as e:
        o.merge(pr.HostOptions(options={"appraise": "off"}), "annotation", "profile web")
    assert "appraise= is given by profile web (log) and by annotation (off)" in str(e.value)
    with pytest.raises(pr.ProfileError) as e:
        o.merge(pr.HostOptions(policy="x", policy_from="policy=/x"), "cli", "profile web")
    assert "a policy is given by profile web and by policy=/x" in str(e.value)


def test_config(tmp_path):
    if not os.path.exists(pr.DEFAULT_CONFIG):       # no file: the defaults
        cfg = pr.load_config(None)
        assert cfg.source == "defaults" and cfg.archive == "/var/lib/imafs/archive"
        assert cfg.profiles == "/etc/imafs/profiles" and not cfg.allow_host_paths
    c = tmp_path / "hook.conf"
    c.write_text("# the hook\nprofiles = /srv/profiles\narchive = none\n"
                 "allow_host_paths = yes\ndefault_profile = web\nstate_dir = /run/x\n"
                 "remove_wait = 2.5\n")
    cfg = pr.load_config(str(c))
    assert (cfg.profiles, cfg.archive, cfg.allow_host_paths, cfg.default_profile,
            cfg.state_dir, cfg.remove_wait) == ("/srv/profiles", None, True, "web", "/run/x",
                                                2.5)
    for text, why in (("colour = blue\n", "unknown setting 'colour'"),
                      ("profiles = relative\n", "absolute path"),
                      ("allow_host_paths = maybe\n", "yes or no"),
                      ("remove_wait = -1\n", "0-600"), ("archive\n", "KEY = VALUE"),
                      ("archive = /a\narchive = /b\n", "given twice")):
        c.write_text(text)
        with pytest.raises(pr.ProfileError) as e:
            pr.load_config(str(c))
        assert why in str(e.value) and "line" in str(e.value)
    c.write_text("archive = none\n")
    os.chmod(c, 0o666)
    with pytest.raises(pr.ProfileError) as e:
        pr.load_config(str(c))
    assert "writable by group or others" in str(e.value)
    with pytest.raises(pr.ProfileError) as e:
        pr.load_config(str(tmp_path / "missing.conf"))
    assert "No such file" in str(e.value)


def test_the_shipped_examples_load(tmp_path):
    """examples/oci/: the profile and the configuration the docs point to, and
    examples/host.policy, are what the hook and the mount take."""
    from imafs.ima.policy_parse import load_policy_arg
    repo = Path(__file__).resolve().parents[3]
    ex = repo / "examples"
    shutil.copytree(ex / "oci" / "profiles", tmp_path / "profiles")
    for d, _, files in os.walk(tmp_path):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    o = pr.load_profile(str(tmp_path / "profiles"), "web")
    assert "measure func=BPRM_CHECK" in o.policy and o.options == {"appraise": "enforce",
                                                                   "template": "ima-ng"}
    conf = tmp_path / "oci-hook.conf"
    shutil.copy(ex / "oci" / "oci-hook.conf", conf)
    os.chmod(conf, 0o644)
    cfg = pr.load_config(str(conf))
    assert (cfg.profiles, cfg.archive, cfg.allow_host_paths) == (
        "/etc/imafs/profiles", "/var/lib/imafs/archive", False)
    assert len(load_policy_arg(str(ex / "host.policy"))) == 5
    hooks = json.loads((ex / "oci" / "hooks.json").read_text())
    assert hooks["hooks"]["createRuntime"][0]["args"] == ["imafs", "oci-hook"]


def test_evm_options_in_profiles_and_annotations(base, tmp_path):
    """A profile's options may name the namespace's EVM HMAC key: it stays a path (the
    daemon reads the key); in annotations it is a host path like policy= and keys=."""
    (base / "web" / "options").write_text("evm=enforce\nevm_key=/etc/imafs/web.evm\n")
    o = pr.load_profile(str(base), "web")
    assert o.options == {"evm": "enforce", "evm_key": "/etc/imafs/web.evm"}
    for key in ("evm_key=relative", "evm_key=/k evm_key=/k"):
        (base / "web" / "options").write_text(key.replace(" ", "\n") + "\n")
        with pytest.raises(pr.ProfileError) as e:
            pr.load_profile(str(base), "web")
        assert "evm_key=" in str(e.value)
    words = ["evm=log", "evm_key=/etc/imafs/web.evm"]
    with pytest.raises(pr.ProfileError) as e:
        pr.parse_option_words(words, host_files=False, source="annotation org.imafs.options",
                              strict=True)
    assert "evm_key=" in str(e.value) and "names a host file" in str(e.value)
    o = pr.parse_option_words(words, host_files=True, source="cli", strict=False)
    assert o.options == {"evm": "log", "evm_key": "/etc/imafs/web.evm"}


def _model_text() -> str:
    from imafs.ima import model as M, modelmap as mm
    from imafs.ima.modelfile import format_model
    m = M.Model()
    m.decide(M.Actor((1, 1), None, mm.Coe()),
             mm.file_open("/a", mm.Inode(0, 0, 0o100644), bytes(32), 4))
    return format_model(m.export()).decode()


def test_models_from_words_and_profiles(base, tmp_path):
    """model=learn is an option; model=FILE a host file, read and checked here (its
    text goes in the request); a profile's model file; never both."""
    (tmp_path / "m.model").write_text(_model_text())
    o = pr.parse_option_words(["model=learn"], host_files=False, source="a", strict=True)
    assert o.options == {"model": "learn"} and o.model is None
    o = pr.parse_option_words([f"model={tmp_path / 'm.model'}"], host_files=True,
                              source="cli", strict=False)
    assert o.model == _model_text() and "model" not in o.options
    with pytest.raises(pr.ProfileError) as e:
        pr.parse_option_words([f"model={tmp_path / 'm.model'}"], host_files=False,
                              source="annotation org.imafs.options", strict=True)
    assert "names a host file" in str(e.value)
    (tmp_path / "bad.model").write_text("aggregate 00\n")
    with pytest.raises(pr.ProfileError) as e:
        pr.parse_option_words([f"model={tmp_path / 'bad.model'}"], host_files=True,
                              source="cli", strict=False)
    assert "model file line 1" in str(e.value)
    (base / "web" / "model").write_text(_model_text())
    p = pr.load_profile(str(base), "web")
    assert p.model == _model_text() and p.model_from == "profile web"
    with pytest.raises(pr.ProfileError) as e:
        p.merge(pr.HostOptions(options={"model": "learn"}), "cli", "profile web")
    assert "one or the other" in str(e.value)
    (base / "web" / "options").write_text("model=/etc/x.model\n")
    with pytest.raises(pr.ProfileError) as e:
        pr.load_profile(str(base), "web")
    assert "is the profile's own model file" in str(e.value)
