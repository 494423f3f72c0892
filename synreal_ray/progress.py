"""Progress on the console: a tqdm bar when stderr is a terminal, log lines otherwise, nothing
when the caller's logger is quieter than INFO (`synreal -q`, or a library user who set no logging).

Training runs in Ray Train workers, whose output reaches the console only when Ray forwards worker
logs (`synreal -v`). So rank 0 posts its step to a small actor (`Board`) and the driver draws:

    with TrainingProgress("train", total=cfg.steps, batch_size=cfg.batch_size, log_every=cfg.log_every,
                          logger=log) as board:       # board: an actor handle, or None
        ...train_loop_config={"progress": board}...  trainer.fit()
    # in the worker:  post = StepPoster(board, cfg.steps); post(step, losses)   (rank 0)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

POST_SECONDS = 0.5  # rank 0 posts at most this often (and always its last step)
POLL_SECONDS = 0.5  # the driver reads the board this often


_scope: str | None = None  # what the pipeline is working on ("unit-baseline"): named by every bar


@contextlib.contextmanager
def scope(name: str | None):
    """Bars and progress lines drawn inside the block name `name` after the stage ("train
    unit-baseline: 40%|..."), so a pipeline needs no header line per step."""
    global _scope
    before, _scope = _scope, name
    try:
        yield
    finally:
        _scope = before


def described(what: str) -> str:
    """`what`, followed by the current scope's name when there is one."""
    return f"{what} {_scope}" if _scope else what


def shown(logger: logging.Logger) -> bool:
    """Progress is INFO: shown when `logger` shows INFO."""
    return logger.isEnabledFor(logging.INFO)


def bar_drawn(logger: logging.Logger) -> bool:
    """Progress for `logger` is drawn as a bar (stderr is a terminal), not logged as lines."""
    return shown(logger) and sys.stderr.isatty()


class _NoBar:
    """What `bar` returns when nothing is drawn: update and close do nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def bar(total: int, desc: str, unit: str, logger: logging.Logger, initial: int = 0, leave: bool = True):
    """A tqdm bar on stderr when it is a terminal and `logger` shows INFO; else one that draws
    nothing. Both have update(n), close() and work as context managers. leave=False: erased when
    closed (for work whose result line follows)."""
    if not bar_drawn(logger):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=described(desc), file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True, leave=leave)


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Board:
    """Ray actor (num_cpus=0): the latest step rank 0 posted."""

    def __init__(self):
        self.latest: dict | None = None

    def post(self, record: dict) -> None:
        self.latest = record

    def get(self) -> dict | None:
        return self.latest


class StepPoster:
    """Rank 0's side: posts (step, losses, time) at most every POST_SECONDS and at the last step;
    fire and forget, so a step never waits on the driver."""

    def __init__(self, board, total: int):
        self.board, self.total, self._last = board, total, 0.0

    def __call__(self, step: int, losses: dict[str, float]) -> None:
        now = time.monotonic()
        if self.board is None or (step < self.total and now - self._last < POST_SECONDS):
            return
        self._last = now
        self.board.post.remote({"step": step, "losses": {k: float(v) for k, v in losses.items()}, "time": time.time()})


class TrainingProgress:
    """The driver's side (see the module doc): a thread reads the board and draws a bar with
    step/steps, the losses, images/s and the ETA, or, off a terminal, logs a line every
    `log_every` steps. Rates and the ETA come from the worker's own clock between its posts, so
    start-up and the first step are left out."""

    def __init__(self, name: str, total: int, batch_size: int, log_every: int, logger: logging.Logger,
                 keys: tuple[str, ...] | None = None):
        self.name, self.total, self.batch_size, self.log_every = described(name), total, batch_size, log_every
        self.logger = logger
        self.keys = keys
        self.board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._first: dict | None = None
        self._logged = -1

    def __enter__(self):
        if not shown(self.logger):
            return None
        import ray

        self.board = ray.remote(num_cpus=0)(Board).remote()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-progress", daemon=True)
        self._thread.start()
        return self.board

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.show(self._read())  # the last step, which may have come after the last poll
        if self._bar is not None:
            self._bar.close()
        import ray

        ray.kill(self.board)

    def _read(self) -> dict | None:
        import ray

        try:
            return ray.get(self.board.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 progress is a nicety: never fail training over it
            return None

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.show(self._read())

    def line(self, rec: dict) -> str:
        """`step/steps, losses, images/s, ETA` of a posted record."""
        losses = {k: v for k, v in rec["losses"].items() if self.keys is None or k in self.keys}
        parts = [", ".join(f"{k} {v:.3g}" for k, v in losses.items())]
        first = self._first
        if first is not None and rec["step"] > first["step"] and rec["time"] > first["time"]:
            steps_per_s = (rec["step"] - first["step"]) / (rec["time"] - first["time"])
            parts.append(f"{steps_per_s * self.batch_size:.1f} img/s")
            parts.append(f"ETA {duration((self.total - rec['step']) / steps_per_s)}")
        else:
            parts.append("ETA ?")
        return ", ".join(p for p in parts if p)

    def show(self, rec: dict | None) -> None:
        """Draw (or log) a record the board returned."""
        if rec is None:
            return
        if self._first is None:
            self._first = rec
        if sys.stderr.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=rec["step"], desc=self.name, unit="step", file=sys.stderr,
                                 dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                                                "{n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            self._bar.set_postfix_str(self.line(rec), refresh=False)
            self._bar.update(rec["step"] - self._bar.n)
        elif rec["step"] != self._logged and (rec["step"] == self.total
                                              or rec["step"] // self.log_every > self._logged // self.log_every):
            self._logged = rec["step"]
            self.logger.info("%s: step %d/%d, %s", self.name, rec["step"], self.total, self.line(rec))
