"""Benchmark: who gets the CPU while `synreal train` trains, process by process.

  python jobs/bench_cpu_share.py [--steps 60]
  python jobs/bench_cpu_share.py --idle-tax [--actors 8] [--repeats 2]

Runs one `synreal train` as jobs/bench_peers.py does (CycleGAN, 16 base channels, 6 residual
blocks, 64x128, batch 4, 1 worker, demo data, a local Ray of its own in a temporary folder) and
reads every process's CPU time (Linux /proc: user + system) twice in its steady phase: when
metrics.jsonl first shows step 10 and again 15 steps before the end. Prints the machine's CPU
seconds in that window, the Ray Train worker's share of them, and each other process that used
CPU meanwhile (Ray's daemons, Ray Train's actors, synreal's progress board). What the others take
is what a training step loses against the plain loop of jobs/bench_peers.py, which has the
machine to itself. Linux only.

--idle-tax measures that loss without Ray Train: the plain loop of jobs/bench_peers.py (20
iterations, 2 torch threads) alone, then beside a local Ray holding `--actors` idle actors (about
as many Python processes as a Ray Train fit keeps alive), then the same at nice 15 (the priority
Ray gives its worker processes), interleaved `--repeats` times; prints the steady seconds per
iteration of each and the ratios to the loop alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers import Runner, child_env, make_data  # noqa: E402


def cpu_times() -> dict[int, tuple[float, int, str]]:
    """{pid: (CPU seconds so far, nice, name)} of every process now."""
    hz = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        words = cmd.split()
        if cmd.startswith("ray::"):  # a Ray worker process: its actor or task
            name = words[0]
        elif not words:  # a kernel thread
            name = stat[stat.find("(") + 1:stat.rfind(")")]
        elif "python" in Path(words[0]).name:  # a Python program: its script
            name = next((Path(a).name for a in words[1:] if not a.startswith("-")), "python")
        else:
            name = Path(words[0]).name
        found[int(pid)] = ((int(fields[11]) + int(fields[12])) / hz, int(fields[16]), name)
    return found


def last_step(metrics: Path) -> int:
    try:
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
    except OSError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def idle_tax(root: Path, config: Path, actors: int, repeats: int) -> None:
    """The plain loop alone, beside an idle local Ray with `actors` idle actors, and so at nice 15."""
    import statistics

    import ray

    env = child_env(root)
    runner = Runner(env, root)
    plain = runner.plain("train", "--config", str(config), "--steps", "20", "--threads", "2")

    def per_iteration(nice: int) -> float:
        done = subprocess.run(["nice", "-n", str(nice), *plain], env=env, cwd=root, capture_output=True, text=True, check=True)
        return 4 / json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]  # batch 4

    os.environ.update({k: env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")})
    times = {"alone": [], "beside an idle Ray": [], "beside an idle Ray, at nice 15": []}
    for _ in range(repeats):
        times["alone"].append(per_iteration(0))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            idle = [ray.remote(num_cpus=0)(Idle).remote() for _ in range(actors)]
            ray.get([a.ready.remote() for a in idle])
            time.sleep(3)  # past their start-up
            times["beside an idle Ray"].append(per_iteration(0))
            times["beside an idle Ray, at nice 15"].append(per_iteration(15))
        finally:
            ray.shutdown()
    alone = statistics.median(times["alone"])
    print(f"\nplain loop, 20 iterations at 2 torch threads; idle Ray: {actors} idle actors; medians of {repeats}\n")
    print("| plain loop | seconds per iteration | vs alone |")
    print("|---|---|---|")
    for what, values in times.items():
        print(f"| {what} | {statistics.median(values):.3f} ({', '.join(f'{v:.3f}' for v in values)}) | "
              f"{statistics.median(values) / alone:.2f}x |")


class Idle:
    """An actor that does nothing: what an idle Ray worker process costs."""

    def ready(self) -> bool:
        return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps (the window is steps 10 .. steps-15)")
    p.add_argument("--idle-tax", action="store_true", help="the plain loop alone and beside an idle Ray (see above)")
    p.add_argument("--actors", type=int, default=8, help="--idle-tax: idle actors in the Ray beside the loop")
    p.add_argument("--repeats", type=int, default=2, help="--idle-tax: rounds, interleaved")
    args = p.parse_args(argv)
    if args.steps < 30:
        p.error("--steps: at least 30 (the window is steps 10 .. steps-15)")
    from machine import describe

    root = Path(tempfile.mkdtemp(prefix="bench-cpu-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        for sub in ("ray", "tmp"):
            (root / sub).mkdir()
        d = make_data(root, 96, 64)
        if args.idle_tax:
            print(f"machine: {describe()}")
            idle_tax(root, d["config"], args.actors, args.repeats)
            return
        out = root / "train"
        cmd = Runner(child_env(root), root).synreal + ["train", "--config", str(d["config"]), "--steps",
                                                      str(args.steps), "--out", str(out)]
        print(f"machine: {describe()}")
        print(f"command: {' '.join(cmd)} (under a temporary folder, removed)")
        proc = subprocess.Popen(cmd, env=child_env(root), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = second = None
        while proc.poll() is None and second is None:
            time.sleep(0.5)
            step = last_step(out / "metrics.jsonl")
            if first is None and step >= 10:
                first = (time.monotonic(), cpu_times(), step)
            elif first is not None and step >= args.steps - 15:
                second = (time.monotonic(), cpu_times(), step)
        stderr = proc.communicate()[1].decode(errors="replace")
        if proc.returncode or second is None:
            raise SystemExit(f"synreal train failed or ended early (exit {proc.returncode}):\n{stderr[-3000:]}")
        (t0, a, s0), (t1, b, s1) = first, second
        capacity = (t1 - t0) * len(os.sched_getaffinity(0))
        used = sorted(((cpu - a.get(pid, (0.0,))[0], nice, name) for pid, (cpu, nice, name) in b.items()
                       if cpu - a.get(pid, (0.0,))[0] > 0), reverse=True)
        worker = sum(u for u, _, name in used if name.startswith("ray::RayTrainWorker"))
        print(f"\nsteps {s0}..{s1}: {t1 - t0:.1f} s wall, {capacity:.1f} CPU seconds on {len(os.sched_getaffinity(0))} cores; "
              f"the Ray Train worker used {worker:.1f} ({100 * worker / capacity:.1f} %), all others "
              f"{sum(u for u, _, _ in used) - worker:.1f} ({100 * (sum(u for u, _, _ in used) - worker) / capacity:.1f} %)\n")
        print("| process | CPU seconds | share of the machine | nice |")
        print("|---|---|---|---|")
        for u, nice, name in used:
            if u >= 0.05:
                print(f"| {name[:60]} | {u:.2f} | {100 * u / capacity:.1f} % | {nice} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
