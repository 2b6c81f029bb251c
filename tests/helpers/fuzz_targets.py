"""scripts/fuzz.py, loaded as the module ``fuzz`` (a script, not a package: its
``TARGETS`` and inputs for the hostile-input tests), and ``EXAMPLES``, how many
hypothesis examples those tests try (FUZZ_EXAMPLES, default 300). Not a test module."""
from __future__ import annotations

import importlib.util
import os

from helpers.mounts import REPO

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("imafs_fuzz", REPO / "scripts" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _fuzz_module()
