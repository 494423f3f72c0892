"""What `synreal` prints (issue 13): on a terminal a short console with a training ETA and none of
Ray's own logs; with -v Ray's logs come back; with -q only warnings.

The commands run as people run them, under a real pseudo-terminal (tests/ptyrun.py) where it
matters, against the session's Ray cluster (RAY_ADDRESS, as on a real cluster)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from ptyrun import screen
from synreal_ray.progress import TrainingProgress

CLI = [sys.executable, "-m", "synreal_ray.cli"]


@pytest.fixture(scope="module")
def env(ray_cluster):
    return {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def test_screen_applies_redraws_and_drops_colours():
    raw = "a\x1b[32mb\x1b[0m\n10%|#  |\r50%|## |\r100%|###|\nx\n\x1b[Aye\x1b[K\nz\r\n"
    assert screen(raw) == "ab\n100%|###|\nye\nz"


# A training run on a terminal (its bar with the ETA, none of Ray's logs, a short screen) is checked
# on the README's own `synreal train` and demo commands, which tests/test_readme.py runs under a pty.


def test_verbose_brings_ray_s_logs_back_and_quiet_keeps_warnings_only(demo_data, env, tmp_path):
    features = ["features", "--dataset", str(demo_data / "syn"), "--layout", "synscapes", "--out", str(tmp_path / "f")]
    verbose = subprocess.run(CLI + ["-v"] + features, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert verbose.returncode == 0, verbose.stderr
    assert "Connecting to existing Ray cluster" in verbose.stderr, verbose.stderr  # Ray's own log line
    assert "features: 24 samples" in verbose.stdout
    quiet = subprocess.run(CLI + ["-q"] + features + ["--force"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=240)
    assert quiet.returncode == 0, quiet.stderr
    assert all("warning" in line.lower() for line in quiet.stderr.splitlines()), quiet.stderr
    assert "features: 24 samples" in quiet.stdout  # the result the command exists to print


def test_training_progress_off_a_terminal_logs_every_log_every_steps_with_the_eta(caplog):
    logger = logging.getLogger("synreal_ray.test_console")
    progress = TrainingProgress("train", total=6, batch_size=4, log_every=2, logger=logger, keys=("gen_total",))
    with caplog.at_level(logging.INFO, logger=logger.name):
        for step in (1, 2, 3, 5, 6, 6):  # as the driver reads them: 4 was overtaken, 6 read twice
            progress.show({"step": step, "losses": {"gen_total": 1.0 / step, "dis_total": 0.5}, "time": 100.0 + step})
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == [
        "train: step 1/6, gen_total 1, ETA ?",
        "train: step 2/6, gen_total 0.5, 4.0 img/s, ETA 0:04",
        "train: step 5/6, gen_total 0.2, 4.0 img/s, ETA 0:01",
        "train: step 6/6, gen_total 0.167, 4.0 img/s, ETA 0:00"]
