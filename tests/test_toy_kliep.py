"""The toy KLIEP GAN job (jobs/toy_kliep_gan.py) in --quick mode: a table with finite numbers, and
the Wasserstein/energy distances exposed in the returned dict and in the JSON summary.

Why there is NO "KLIEP GAN beats vanilla GAN" assertion here (issue 12 part 6 asked for one, with a
wide margin, if it holds honestly). Measured on the 2-core AMD EPYC CI-like machine (no GPU, shared,
torch on 1 thread; the same training loop as train_gan, evaluated at checkpoints), Wasserstein
distance of each generator's output to fresh target values:

* --quick (1000 vectors of size 50, 5 epochs = 25 SGD steps), seed 0: vanilla 6.41, KLIEP 6.44.
  Neither GAN has moved: both outputs still sit near 0 (the target is N(7, 0.5)).
* 1000 x 50, 40 epochs (200 steps): seed 0 vanilla 7.08 / KLIEP 7.19, seed 1 7.37 / 6.95
  (still not trained).
* 1000 x 50, 150 epochs: vanilla converges (W 0.09 from epoch 130 on, seed 0), KLIEP stalls at a
  mean of ~6.0 (W ~1.0). 2000 x 50, 100 epochs, seed 0: vanilla 0.08, KLIEP 0.83.
* 2000 x 300, hidden 128, 100 epochs, seeds 0 / 1: vanilla 1.03 / 1.16, KLIEP 1.01 / 1.23 (a tie).
* The candidate test setting, 5 seeds: 1000 x 100, hidden 128, 60 epochs (300 steps), lr 0.02 (G)
  / 0.01 (D), 100 KLIEP centres (~10-25 s per seed for both GANs). Seeds 0 / 1 / 2 / 3 / 4:
  vanilla 1.94 / 0.52 / 0.75 / 1.33 / 1.03, KLIEP 0.84 / 7.30 / 5.66 / 0.68 / 0.96. KLIEP wins 3 of
  5 (ratios 0.43, 0.51, 0.93) and loses 2 by a mile (its GAN had not left the stuck phase yet).
  At 1000 x 300 with the same settings, seeds 0 / 1 / 2: vanilla 6.61 / 7.17 / 6.71, KLIEP
  2.68 / 6.37 / 6.12, i.e. mostly neither GAN trained.
* The paper's own setting (10,000 x 300, 40 epochs, batch 200, lr 8e-3 / 4e-3, 100 centres;
  ~2.5-3 min per seed), seeds 0 / 1 / 2: vanilla 0.70 / 0.35 / 0.44, KLIEP 0.41 / 0.43 / 0.62.
  Only seed 0 reproduces the paper's Table II direction (1.32 vs 1.08).

What decides the result is when each GAN leaves its initial stuck phase (output ~0): after that
both converge to the target. Which one leaves first depends on the seed, and at small sizes the
vanilla GAN leaves first as often as the KLIEP one, and converges to a closer fit. So no seed-size
combination that runs in seconds gives a margin that is real rather than a lucky seed, and pinning
one would assert luck, not the paper's claim. Seeds 3 and 4 of the paper-scale setting were not
run (time).
"""

import importlib.util
import json
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


def check_summary(summary):
    """The JSON-able part of main()'s result: distances to the target for every non-target row."""
    assert list(summary["table"]) == ROWS
    assert set(summary["wasserstein"]) == set(summary["energy"]) == set(ROWS[1:])
    for name in ROWS[1:]:
        wd, ed = summary["wasserstein"][name], summary["energy"][name]
        assert math.isfinite(wd) and math.isfinite(ed) and wd > 0 and ed > 0
        assert wd == summary["table"][name]["wasserstein"] and ed == summary["table"][name]["energy"]
    assert abs(summary["wasserstein"]["Source (uniform)"] - 2.56) < 0.1  # the paper's source row
    assert summary["setup"]["n"] == 1000 and summary["setup"]["dim"] == 50  # --quick
    assert summary["kliep"]["sigma"] > 0 and 1 <= summary["kliep"]["ess"] <= 1000


def test_quick_run_in_process(tmp_path):
    out = load_job().main(["--quick", "--threads", "1", "--out", str(tmp_path)])
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
    check_summary(out)
    assert json.loads((tmp_path / "results.json").read_text())["wasserstein"] == out["wasserstein"]
    assert (tmp_path / "hist.png").stat().st_size > 1000
    assert "| KLIEP GAN |" in (tmp_path / "results.md").read_text()


def test_quick_run_as_script(tmp_path):
    js = tmp_path / "sub" / "toy.json"
    p = subprocess.run([sys.executable, str(JOB), "--quick", "--threads", "1", "--json", str(js)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    summary = json.loads(js.read_text())
    check_summary(summary)
    for row in ROWS:
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == 4
        nums = [float(c) for c in cells if c != "-"]
        assert len(nums) == (2 if row == "Target (Gauss)" else 4)
        assert all(math.isfinite(x) for x in nums)
        if row != "Target (Gauss)":  # the table and the JSON agree (to the table's 2 decimals)
            assert abs(nums[2] - summary["wasserstein"][row]) <= 0.006
    assert re.search(r"KLIEP: sigma=[0-9.e+-]+", p.stdout)
