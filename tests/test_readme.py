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
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from browser import NO_CHROMIUM, find_chromium, open_in_chromium
from ptyrun import ray_noise, run_pty
from synreal_ray import storage
from synreal_ray.pipeline import load_pipeline_config

from conftest import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"
NOT_IN_CI = "# not run in CI:"

# Appended to the README command that starts with the key's words. Sizes only.
SIZE_OVERRIDES: dict[str, list[str]] = {
    "synreal make-demo-data": ["--num-syn", "16", "--num-real", "12", "--num-val", "8", "--height", "64",
                               "--width", "128"],
    "synreal run --config configs/demo.yaml": [
        "--set", "train.steps=2", "--set", "fid.dims=64", "--set", "segment.steps=2",
        "--set", "runs=[{name: unit-method, model: unit, pairing: spfeat, weighting: loss}]"],
    "synreal tune --config configs/sweep.yaml": [
        "--set", "tune.space.k=[3]", "--set", "tune.space.levels=['1,2', '2x4']", "--set", "tune.space.sigma=[null]",
        "--set", "tune.space.weighting=[loss]", "--set", "tune.milestones=[2]", "--set", "tune.val_images=4",
        "--set", "fid.dims=64", "--set", "segment.steps=2"],
    "synreal train": ["--steps", "2"],
    "synreal fid": ["--dims", "64"],
    "synreal segment": ["--steps", "2"],
}
SIZE_FLAGS = {"--num-syn", "--num-real", "--num-val", "--height", "--width", "--steps", "--dims"}
SIZE_KEYS = re.compile(r"^(train\.steps|segment\.steps|fid\.dims|runs|tune\.milestones|tune\.val_images|tune\.space\.\w+)$")


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
def test_readme_usage_commands_run_as_written(tmp_path, ray_cluster, random_inception):
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")  # what a fresh clone holds beside the code
    # The fid command reads pytorch-fid's weights from the working directory; CI has no network,
    # so a seeded random-weight file of that name stands in for the download.
    shutil.copyfile(random_inception, work / "pt_inception-2015-12-05-6726825d.pth")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SYNREAL_FID_CACHE": str(tmp_path / "fid-cache")}
    env.pop("SYNREAL_INCEPTION_WEIGHTS", None)
    times: list[tuple[str, str]] = []
    screens: dict[str, str] = {}  # the README command's words -> its screen
    for line, words in readme_commands():
        if words is None:
            print(f"not run in CI: {line}", flush=True)
            continue
        cmd = words + overrides_for(words)
        t = time.time()
        # On a terminal, as a person runs it: what the screen shows at the end (bars redrawn in place).
        code, screen = run_pty(cmd, cwd=work, env=env, timeout=600)
        screens[" ".join(words)] = screen
        times.append((shlex.join(cmd), f"{time.time() - t:.1f} s"))
        print(f"{times[-1][1]:>10}  {times[-1][0]}", flush=True)
        assert code == 0, f"README command failed ({code}): {line}\n(run as {shlex.join(cmd)})\n{screen[-8000:]}"
        assert not ray_noise(screen), f"{line}: Ray's own logs reached the console:\n{screen[-4000:]}"
        if words[:2] == ["synreal", "tune"]:
            assert re.search(r"sweep of 2 trials\b", screen), screen[-3000:]
            assert "first trial finished in" in screen
        if words[:2] == ["synreal", "train"]:  # the training bar's final state: steps, losses, images/s, ETA
            assert re.search(r"^train: 100%\|.*\| 2/2 \[[\d:]+, gen_total [\d.e+-]+, dis_total [\d.e+-]+, "
                             r"[\d.]+ img/s, ETA 0:00\]$", screen, re.M), screen
            assert len(screen.splitlines()) < 15, screen

    # `synreal demo` is these two commands: on a terminal, at this CI size (one run), under 100 lines
    # with a training ETA, each bar named after its run. (The full demo, four runs and six
    # segmenters, printed 87 lines: `python tests/ptyrun.py synreal demo`, see the README.)
    demo = screens["synreal make-demo-data --out data/demo"] + "\n" + screens["synreal run --config configs/demo.yaml"]
    print(f"demo console: {len(demo.splitlines())} lines\n{demo}", flush=True)
    assert len(demo.splitlines()) < 100 and re.search(r"^train unit-method: 100%.*ETA 0:00\]$", demo, re.M), demo
    assert re.search(r"^seg-eval consistency unit-method: mIoU [\d.]+%", demo, re.M), demo

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
    # The README's `synreal run --config out/sweep/best.yaml` is not run here (it is the demo pipeline
    # again, ~90 s of CI); the file it reads is a valid pipeline config with the best trial's setting.
    best_cfg = load_pipeline_config(str(sweep / "best.yaml"))
    assert best_cfg.pairs.k == int(rows[0]["k"]) and best_cfg.features.levels == rows[0]["levels"]
    assert (work / "out" / "demo" / "report.md").exists() and (work / "out" / "translated" / "manifest.parquet").exists()
    demo_out = work / "out" / "demo"
    report = json.loads((demo_out / "report.json").read_text())
    tables = report["tables"]
    assert list(tables) == ["consistency_miou", "downstream_miou", "fid", "kid"]
    for key, table in tables.items():  # every metric with its raw-synthetic, run and ceiling rows, all scored
        assert [r["kind"] for r in table["rows"]][:1] == ["raw synthetic"], key
        assert {"raw synthetic", "run", "ceiling"} <= {r["kind"] for r in table["rows"]}, key
        value = "fid" if key == "fid" else "kid" if key == "kid" else "miou"
        assert all(r[value] is not None for r in table["rows"]), key
    assert "unit-method" in report["confusions"]
    assert (demo_out / "runs" / "unit-method" / "consistency.png").read_bytes()[:4] == b"\x89PNG"
    for stage in ("train", "translated", "segment", "consistency"):
        assert storage.is_complete(str(demo_out / "runs" / "unit-method" / stage)), stage
    # report.html in a real browser: every image decodes, every table and section is there
    if find_chromium():
        seen = open_in_chromium(demo_out / "report.html", tmp_path)
        assert seen["broken"] == [] and seen["images"] >= 8 and seen["tables"] >= 4, seen
        assert {"Results", "Before and after", "Runs", "Pairs (SP-Feat)", "KLIEP importance weights",
                "Segmentation evaluations"} <= set(seen["headings"]), seen
    else:
        print(f"report.html not opened in a browser: {NO_CHROMIUM}")
    report = (demo_out / "report.md").read_text()
    for title, rows in (("### Semantic consistency", ("| raw synthetic (no translation) |", "| ceiling: the judge on real val |")),
                        ("### Downstream segmentation", ("| trained on raw synthetic |", "| ceiling: trained on real train |")),
                        ("### FID", ("| synthetic vs real val (no adaptation) |", "| real train vs real val (floor) |")),
                        ("### KID", ("| synthetic vs real val (no adaptation) |", "| real train vs real val (floor) |"))):
        section = report[report.index(title):].split("\n### ")[0]  # the table under that title
        assert all(row in section for row in rows), (title, section)
        assert "| unit-method" in section, title
