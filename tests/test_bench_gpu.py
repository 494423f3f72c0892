"""jobs/bench_gpu.py, the prepared GPU checks (shared/GPU-CHECKLIST.md), run with --quick on the
CPU: every check's code path works here, so a session lent a GPU spends its minutes measuring."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_quick_run_on_the_cpu_measures_every_check(tmp_path):
    # as on the device machine, which has no Ray: importing it fails
    hide_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", hide_ray, "jobs/bench_gpu.py", "--quick", "--device", "cpu",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = result["rows"]
    assert result["failed"] == [] and result["quick"] is True
    assert {r["check"] for r in rows} == {"train", "kliep", "translate", "inception", "segment", "knn"}
    for r in rows:  # the test extra installs pytorch-fid and faiss: nothing is skipped here
        assert r["device"] > 0 and r["cpu"] > 0, r
    train = [r for r in rows if r["check"] == "train"]
    assert len(train) == 4 and all(r["finite"] for r in train)  # unit and cyclegan, fp32 and amp
    kliep = next(r for r in rows if r["check"] == "kliep")
    assert kliep["objective_gap"] < 1e-5  # torch and numpy solve the same float32 problem (3.6e-7 apart here)
    assert next(r for r in rows if r["check"] == "knn")["agreement"] == 1.0
    assert "| train | unit 64x64 batch 2 fp32 |" in p.stdout  # the Markdown table


def test_only_runs_the_checks_named_and_refuses_unknown_ones(tmp_path):
    p = subprocess.run([sys.executable, "jobs/bench_gpu.py", "--quick", "--only", "kliep,warp"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown checks warp" in p.stderr
    p = subprocess.run([sys.executable, "jobs/bench_gpu.py", "--quick", "--only", "kliep", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["check"] for r in json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]] == ["kliep"]
