"""imafs.ima.nsoptions: the one namespace-options grammar (ns-create's text, the host's
OPTION=VALUE words, profiles and annotations)."""
from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings, strategies as st

from imafs.ima import nsoptions as no
from imafs.ima.namespaces import NamespaceError, NamespaceTree, Namespace


def test_names_up_to_64_characters_so_container_ids_fit():
    cid = "3f" * 32                                   # a full 64-hex container id
    assert no.check_name(cid) == cid
    assert no.check_name("a") == "a" and no.check_name("web-1.2_x") == "web-1.2_x"
    for bad in ("", "x" * 65, "-x", ".x", "_x", "a/b", "a b", "na\u00efve", "..", "a\0"):
        with pytest.raises(no.OptionError) as e:
            no.check_name(bad)
        assert "bad namespace name" in str(e.value) and "64" in str(e.value)


def test_value_options_checked_and_normalised():
    name, opts = no.parse_create("web template=ima-sig hash=SHA512 appraise=log")
    assert name == "web" and opts == {"template": "ima-sig", "hash": "sha512",
                                      "appraise": "log"}
    assert no.format_options(opts) == "template=ima-sig hash=sha512 appraise=log"


@pytest.mark.parametrize("text,option,why", [
    ("a template=nope", "template", "unknown template 'nope'"),
    ("a hash=md6", "hash", "md6"),
    ("a appraise=maybe", "appraise", "not one of enforce, log, fix, off"),
    ("a appraise=log appraise=off", "appraise", "given twice"),
    ("a appraise=", "appraise", "empty value"),
    ("a bogus=1", "", "unknown option 'bogus=1'"),
    ("a template", "", "is not OPTION=VALUE"),
    ("", "", "needs a name"),
])
def test_bad_options_name_the_option_and_why(text, option, why):
    with pytest.raises(no.OptionError) as e:
        no.parse_create(text)
    assert e.value.option == option and why in str(e.value)
    if option:
        assert str(e.value).startswith(f"{option}=: ")


def test_host_file_options_only_from_the_host():
    for text in ("a policy=/etc/imafs/p", "a keys=/etc/imafs/k"):
        with pytest.raises(no.OptionError) as e:
            no.parse_create(text)
        assert "only a creator on the host gives" in str(e.value)
        assert "write to .imafs/" in str(e.value)
    name, opts = no.parse_create("a policy=/etc/p keys=/etc/k appraise=log", host_files=True)
    assert opts == {"policy": "/etc/p", "keys": "/etc/k", "appraise": "log"}
    with pytest.raises(no.OptionError) as e:
        no.parse_create("a policy=relative/p", host_files=True)
    assert "not an absolute path" in str(e.value)


def test_evm_options():
    """evm= is a value option; evm_key= names a host file the daemon reads itself: the
    host gives it as a path (a request over the control socket too), never a process
    inside the mount."""
    assert no.parse_create("a evm=log") == ("a", {"evm": "log"})
    with pytest.raises(no.OptionError) as e:
        no.parse_create("a evm=fix")
    assert e.value.option == "evm" and "not one of enforce, log, off" in str(e.value)
    with pytest.raises(no.OptionError) as e:
        no.parse_create("a evm=enforce evm_key=/etc/imafs/k")
    assert e.value.option == "evm_key" and "only a creator on the host" in str(e.value)
    assert no.parse_create("a evm=enforce evm_key=/etc/k", host_files=True)[1] == {
        "evm": "enforce", "evm_key": "/etc/k"}
    assert no.parse_options({"evm_key": "/k"}, host_paths=True) == {"evm_key": "/k"}
    with pytest.raises(no.OptionError):         # but never policy= or keys= as paths
        no.parse_options({"policy": "/p"}, host_paths=True)
    with pytest.raises(no.OptionError) as e:
        no.parse_options({"evm_key": "k"}, host_paths=True)
    assert "not an absolute path" in str(e.value)


def test_model_is_learn_or_an_absolute_path():
    for host in (False, True):
        assert no.parse_create("a model=learn", host_files=host)[1] == {"model": "learn"}
        assert no.parse_create("a model=/m/x.model", host_files=host)[1] == {
            "model": "/m/x.model"}
        for bad in ("teach", "rel/x.model", ""):
            with pytest.raises(no.OptionError) as e:
                no.parse_create(f"a model={bad}", host_files=host)
            assert e.value.option == "model"


@pytest.mark.parametrize("slot", ["digest_lists"])
def test_slots_are_known_and_refused_as_not_built(slot):
    assert no.OPTIONS[slot].kind == "slot" and no.OPTIONS[slot].issue
    for host in (False, True):
        with pytest.raises(no.OptionError) as e:
            no.parse_create(f"a {slot}=1", host_files=host)
        assert e.value.option == slot and "not built yet" in str(e.value)


def test_quota_namespaces():
    """quota= is quota.py's grammar: namespaces:N (1..1024; 0 or -: no limit of its
    own; a count, no size) and the storage kinds, anywhere; unknown kinds and
    malformed items refused, naming the item."""
    assert no.parse_create("a quota=namespaces:16") == ("a", {"quota": "namespaces:16"})
    assert no.parse_options(["quota=namespaces:007"]) == {"quota": "namespaces:7"}
    assert no.parse_options(["quota=namespaces:-"]) == {"quota": "namespaces:0"}
    assert no.parse_options(["quota=list:5:1K,namespaces:2"]) == {
        "quota": "list:5:1024,namespaces:2"}
    for bad, why in (("3", "expected KIND:ENTRIES"), ("model:5", "expected KIND:ENTRIES"),
                     ("namespaces:1025", "1 to 1024"), ("namespaces:x", "not a count"),
                     ("namespaces:3:1M", "no size"),
                     ("namespaces:3,namespaces:4", "given twice")):
        with pytest.raises(no.OptionError) as e:
            no.parse_options([f"quota={bad}"])
        assert e.value.option == "quota" and why in str(e.value), (bad, str(e.value))


@given(st.text(max_size=40))
def test_quota_parser_refuses_or_normalises(text):
    try:
        got = no.parse_options([f"quota={text}"]) if text else {}
    except no.OptionError as e:
        assert str(e)
        return
    if got:
        assert no.parse_options([f"quota={got['quota']}"]) == got


def test_mappings_take_the_same_grammar():
    assert no.parse_options({"appraise": "fix"}) == {"appraise": "fix"}
    with pytest.raises(no.OptionError):
        no.parse_options({"appraise": 3})
    with pytest.raises(no.OptionError):
        no.parse_options({"policy": "/p"}, source="request")


def test_ns_create_parses_through_the_grammar():
    """ns-create inside the mount (NamespaceTree.parse_create) keeps what it took, with
    EINVAL and the grammar's message for the rest."""
    t = NamespaceTree(Namespace(0, "", None, None, None, None))
    assert t.parse_create("web appraise=log") == ("web", {"appraise": "log"})
    assert t.parse_create("x" * 64)[0] == "x" * 64
    for text, why in (("web policy=/p", "only a creator on the host"),
                      ("web quota=3", "expected KIND:ENTRIES"), ("x" * 65, "at most 64")):
        with pytest.raises(NamespaceError) as e:
            t.parse_create(text)
        assert e.value.errno == errno.EINVAL and why in str(e.value)


_word = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Zs", "Zl", "Zp", "Cc")),
               max_size=20)       # a word: what split() leaves


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(no.OPTIONS) + ["x", ""]), _word),
                max_size=6), st.booleans())
def test_any_words_parse_or_are_refused_with_a_message(pairs, host):
    words = [f"{k}={v}" for k, v in pairs]
    try:
        opts = no.parse_options(words, host_files=host)
    except no.OptionError as e:
        assert str(e).strip()
        return
    assert set(opts) <= set(no.OPTIONS)
    assert no.parse_options(no.format_options(opts).split(), host_files=host) == opts
    if not host:
        assert not set(opts) & set(no.HOST_FILE_OPTIONS + no.HOST_PATH_OPTIONS)
