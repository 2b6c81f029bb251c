"""imafs.ima.evm_secfs: the securityfs ``evm`` flags, read and written as the
kernel's evm_secfs.c does."""
from __future__ import annotations

import errno

import pytest

from imafs.ima import evm_secfs as evm


def test_state_text():
    assert evm.state_text(evm.EVM_INIT_HMAC | evm.EVM_SETUP_COMPLETE) == "1"
    assert evm.state_text(evm.EVM_INIT_X509 | evm.EVM_ALLOW_METADATA_WRITES) == "6"
    assert evm.state_text(0) == "0"


def test_state_write():
    w = evm.state_write
    assert w(0, "2\n", hmac_key_available=False) == evm.EVM_INIT_X509
    assert w(0, b"0x6", hmac_key_available=False) == 6
    assert w(0, "06", hmac_key_available=False) == 6                 # octal
    assert w(0, "+4", hmac_key_available=False) == 4
    got = w(evm.EVM_ALLOW_METADATA_WRITES, "1", hmac_key_available=True)
    assert got == evm.EVM_INIT_HMAC | evm.EVM_SETUP_COMPLETE          # writes disallowed
    assert w(0, str(0x80000002), hmac_key_available=False) == 0x80000002
    for text, err in [("0", errno.EINVAL), ("8", errno.EINVAL), ("x", errno.EINVAL),
                      ("1 ", errno.EINVAL), ("0x", errno.EINVAL), ("09", errno.EINVAL),
                      ("", errno.EINVAL), ("4294967296", errno.ERANGE),
                      ("-1", errno.EINVAL)]:
        with pytest.raises(evm.EvmStateError) as e:
            w(0, text, hmac_key_available=True)
        assert e.value.errno == err, text
    with pytest.raises(evm.EvmStateError) as e:
        w(0, "1", hmac_key_available=False)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(evm.EvmStateError) as e:
        w(evm.EVM_INIT_HMAC, "4", hmac_key_available=True)
    assert e.value.errno == errno.EPERM
    with pytest.raises(evm.EvmStateError) as e:
        w(evm.EVM_SETUP_COMPLETE | 2, "2", hmac_key_available=True)
    assert e.value.errno == errno.EPERM
