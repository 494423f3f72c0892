"""The README's commands, run as written.

The fenced shell blocks of the README's "Usage" section (and its subsections) are extracted and
every command is run verbatim, in order, with its relative paths, in a fresh working directory
that holds what a fresh clone holds (`configs/`). Where a command would take too long for CI,
SIZE_OVERRIDES appends size flags (image counts, steps, number of trials, FID feature size); never
a path: `test_overrides_are_sizes_only` checks that. A command the README marks with
`# not run in CI: <reason>` is skipped (and must give a reason).

The commands talk to the session's Ray cluster (RAY_ADDRESS, as on a real cluster): its workers
run in other working directories than the command, so a relative path that reached Ray unresolved
would fail here.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"
NOT_IN_CI = "# not run in CI:"

# Appended to the README command that starts with the key's words. Sizes only.
SIZE_OVERRIDES: dict[str, list[str]] = {
    "synreal make-demo-data": ["--num-syn", "16", "--num-real", "12", "--num-val", "8", "--height", "64",
                               "--width", "128"],
    "synreal run --config configs/demo.yaml": [
        "--set", "train.steps=2", "--set", "fid.dims=64",
        "--set", "runs=[{name: unit-method, model: unit, pairing: spfeat, weighting: loss}]"],
    "synreal tune --config configs/sweep.yaml": [
        "--set", "tune.space.k=[3]", "--set", "tune.space.levels=['1,2', '2x4']", "--set", "tune.space.sigma=[null]",
        "--set", "tune.space.weighting=[loss]", "--set", "tune.milestones=[2]", "--set", "tune.val_images=4",
        "--set", "fid.dims=64"],
    "synreal train": ["--steps", "2"],
    "synreal fid": ["--dims", "64"],
    "synreal segment": ["--steps", "2"],
}
SIZE_FLAGS = {"--num-syn", "--num-real", "--num-val", "--height", "--width", "--steps", "--dims"}
SIZE_KEYS = re.compile(r"^(train\.steps|fid\.dims|runs|tune\.milestones|tune\.val_images|tune\.space\.\w+)$")


def usage_text() -> str:
    text = README.read_text()
    start = text.index("\n## Usage\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def readme_commands(text: str | None = None) -> list[tuple[str, list[str] | None]]:
    """(the command as the README shows it, its words) for every line of every ```bash / ```sh
    block; words None for a command marked `# not run in CI:`. Backslash continuations joined."""
    text = usage_text() if text is None else text
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if NOT_IN_CI in line:
                assert line.split(NOT_IN_CI, 1)[1].strip(), f"{line!r}: say why it does not run in CI"
                commands.append((line, None))
                continue
            words = shlex.split(line, comments=True)
            assert not set(words) & {"&&", "||", "|", ";", ">", "<"}, f"{line!r}: one plain command per line"
            commands.append((line, words))
    return commands


def overrides_for(words: list[str]) -> list[str]:
    matches = [k for k in SIZE_OVERRIDES if words[: len(k.split())] == k.split()]
    return SIZE_OVERRIDES[max(matches, key=len)] if matches else []


def test_overrides_are_sizes_only():
    for extra in SIZE_OVERRIDES.values():
        flags, values = extra[0::2], extra[1::2]
        for flag, value in zip(flags, values):
            assert flag in SIZE_FLAGS | {"--set"}, f"{flag}: not a size flag"
            if flag == "--set":
                key, _, val = value.partition("=")
                assert SIZE_KEYS.match(key), f"--set {key}: not a size key"
                assert "/" not in val, f"--set {value}: looks like a path"


def test_extraction_finds_the_usage_commands():
    cmds = readme_commands()
    shown = [line for line, _ in cmds]
    assert shown[0].startswith("synreal make-demo-data --out data/demo")
    for needle in ("synreal run --config configs/demo.yaml", "synreal tune --config configs/sweep.yaml",
                   "synreal run --config out/sweep/best.yaml", "synreal features", "synreal fid"):
        assert any(line.startswith(needle) for line in shown), needle
    # a continuation line and a marked command are understood
    fake = "```bash\nsynreal a --x 1 \\\n   --y 2   # note\nsynreal b  # not run in CI: needs a GPU\n```\n"
    assert readme_commands(fake) == [("synreal a --x 1     --y 2   # note", ["synreal", "a", "--x", "1", "--y", "2"]),
                                     ("synreal b  # not run in CI: needs a GPU", None)]


@pytest.mark.timeout(1500)
def test_readme_usage_commands_run_as_written(tmp_path, ray_cluster):
    from synreal_ray.fid import make_random_inception_weights

    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")  # what a fresh clone holds beside the code
    # The fid command reads pytorch-fid's weights from the working directory; CI has no network,
    # so a seeded random-weight file of that name stands in for the download.
    make_random_inception_weights(str(work / "pt_inception-2015-12-05-6726825d.pth"))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SYNREAL_FID_CACHE": str(tmp_path / "fid-cache")}
    env.pop("SYNREAL_INCEPTION_WEIGHTS", None)
    times: list[tuple[str, str]] = []
    for line, words in readme_commands():
        if words is None:
            print(f"not run in CI: {line}", flush=True)
            continue
        cmd = words + overrides_for(words)
        t = time.time()
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        times.append((shlex.join(cmd), f"{time.time() - t:.1f} s"))
        print(f"{times[-1][1]:>10}  {times[-1][0]}", flush=True)
        assert p.returncode == 0, (f"README command failed ({p.returncode}): {line}\n(run as {shlex.join(cmd)})\n"
                                   f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
        if words[:2] == ["synreal", "tune"]:
            assert re.search(r"sweep of 2 trials\b", p.stderr), p.stderr[-3000:]
            assert "first trial finished in" in p.stderr

    sweep = work / "out" / "sweep"
    with open(sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["fid"]) >= 0 and not r["error"] for r in rows)
    assert {r["levels"] for r in rows} == {"1,2", "2x4"}
    assert [float(r["fid"]) for r in rows] == sorted(float(r["fid"]) for r in rows)  # best first
    md = (sweep / "results.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| ") and "rank" not in line]) == 2
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert os.path.realpath(best["out"]) == os.path.realpath(sweep / "best-run") and best["train"]["steps"] == 2
    assert best["pairs"]["k"] == int(rows[0]["k"]) and best["features"]["levels"] == rows[0]["levels"]
    assert (sweep / "best-run" / "report.md").exists()
    assert (work / "out" / "demo" / "report.md").exists() and (work / "out" / "translated" / "manifest.parquet").exists()
