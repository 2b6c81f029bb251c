"""scripts/bench.py runs end to end at smoke-test sizes and writes its reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.mount]

WORKLOADS = ["a", "c", "e"]
MODES = ["native", "overlay"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE filesystems as root")
@pytest.mark.timeout(120)
def test_bench_quick(tmp_path):
    md, js, png = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--reps", "1",
         "--modes", ",".join(MODES), "--only", ",".join(WORKLOADS),
         "--markdown", str(md), "--json", str(js), "--plot", str(png),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=110, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr

    data = json.loads(js.read_text())
    assert sorted(data["workloads"]) == WORKLOADS
    for w in WORKLOADS:
        for m in MODES:
            cell = data["workloads"][w]["modes"][m]
            assert cell["error"] is None, (w, m, cell["error"])
            assert isinstance(cell["median"], float) and cell["median"] > 0, (w, m, cell)
            assert cell["ratio_native"] > 0 and cell["ratio_overlay"] > 0
        assert data["workloads"][w]["modes"]["native"]["ratio_native"] == pytest.approx(1.0)
    assert data["machine"]["nproc"] >= 1 and data["machine"]["kernel"]

    text = md.read_text()
    assert "| workload | native | overlay |" in text
    for w in WORKLOADS:
        assert f"| **{w}** " in text
    assert "Linux " in text and "Python " in text
    # the temporary tree is gone and nothing is left mounted
    assert list((tmp_path / "work").iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
