"""The toy KLIEP GAN job (jobs/toy_kliep_gan.py) in --quick mode: a table with finite numbers."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).resolve().parents[1] / "jobs" / "toy_kliep_gan.py"
ROWS = ["Target (Gauss)", "Source (uniform)", "Vanilla GAN", "KLIEP GAN"]


def load_job():
    spec = importlib.util.spec_from_file_location("toy_kliep_gan", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_in_process(tmp_path):
    out = load_job().main(["--quick", "--out", str(tmp_path)])
    assert [r[0] for r in out["rows"]] == ROWS
    for name, mean, std, wd, ed in out["rows"]:
        assert math.isfinite(mean) and math.isfinite(std) and std > 0
        if name == "Target (Gauss)":
            assert wd is None and ed is None
            assert abs(mean - 7) < 0.05 and abs(std - 0.5) < 0.05
        else:
            assert math.isfinite(wd) and math.isfinite(ed) and wd > 0 and ed > 0
    source = out["rows"][1]
    assert abs(source[1] - 5) < 0.1 and abs(source[3] - 2.56) < 0.1  # matches the paper's source row
    w = out["weights"]
    assert abs(w.mean() - 1) < 1e-6 and (w >= 0).all()
    assert (tmp_path / "hist.png").stat().st_size > 1000
    assert "| KLIEP GAN |" in (tmp_path / "results.md").read_text()


def test_quick_run_as_script():
    p = subprocess.run([sys.executable, str(JOB), "--quick"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    for row in ROWS:
        line = next(l for l in p.stdout.splitlines() if l.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == 4
        nums = [float(c) for c in cells if c != "-"]
        assert len(nums) == (2 if row == "Target (Gauss)" else 4)
        assert all(math.isfinite(x) for x in nums)
    assert re.search(r"KLIEP: sigma=[0-9.e+-]+", p.stdout)
