"""Run a command under a real pseudo-terminal and read back what a person would see
(`python tests/ptyrun.py synreal demo` prints the final screen and counts its lines).

    code, text = run_pty(["synreal", "demo"], cwd=work, env=env, timeout=600)

The command's stdin, stdout and stderr are the slave end of a pty (so `isatty()` is true and tqdm,
Ray Data, ... draw their bars); everything it writes is replayed on a small screen model: carriage
returns, cursor moves and line erases (the redraws of progress bars) are applied, colours dropped,
so `text` holds the final lines as they stand on the terminal at the end.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

ROWS, COLS = 50, 160
# What must not reach a user's console without -v (issue 13): Ray's own logs, forwarded worker output.
RAY_NOISE = ("PlacementGroupCleaner", "Failed to query", "Connecting to existing Ray cluster", "Starting execution",
             "RayDeprecationWarning", "(RayTrainWorker", "(TrainController", "(raylet)", "pid=")
# Ray's warnings still show (README, Console): the raylet pushes these to every driver connected to
# the cluster, whatever log_to_driver says; not its logs, so not noise.
RAY_WARNINGS = ("WARNING: ",)


def ray_noise(screen_text: str) -> list[str]:
    """The lines of a screen that carry Ray's own logs (RAY_NOISE), Ray's pushed warnings left out."""
    return [line for line in screen_text.splitlines()
            if any(n in line for n in RAY_NOISE) and not ("(raylet)" in line and any(w in line for w in RAY_WARNINGS))]


# CSI (ESC [ params final), OSC (ESC ] ... BEL or ESC \), or a two-character escape
_ESCAPE = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def run_pty(cmd: list[str], cwd=None, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """(exit status, the screen's lines joined by newlines). Raises subprocess.TimeoutExpired (with
    the text so far as `output`) after `timeout` seconds, having killed the command's process group."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            # After the command exits, its children (a Ray instance it started) may hold the pty
            # open: drain what is buffered, then stop.
            done = proc.poll() is not None
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the slave end
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif done:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise subprocess.TimeoutExpired(cmd, timeout, output=screen(b"".join(chunks).decode("utf-8", "replace")))
    finally:
        os.close(master)
    return proc.wait(), screen(b"".join(chunks).decode("utf-8", "replace"))


def screen(raw: str) -> str:
    """The final lines of a terminal that received `raw` (unbounded scrollback)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    pos = 0

    def put(ch: str) -> None:
        nonlocal col
        line = lines[row]
        if col < len(line):
            line[col] = ch
        else:
            line.extend(" " * (col - len(line)))
            line.append(ch)
        col += 1

    while pos < len(raw):
        m = _ESCAPE.match(raw, pos)
        if m:
            pos = m.end()
            if m.group(2):
                n = int(m.group(1)) if m.group(1).isdigit() else None
                final = m.group(2)
                if final == "A":
                    row = max(0, row - (n or 1))
                elif final == "B":
                    row += n or 1
                elif final == "C":
                    col += n or 1
                elif final == "D":
                    col = max(0, col - (n or 1))
                elif final == "G":
                    col = (n or 1) - 1
                elif final == "K":
                    if n in (None, 0):
                        del lines[row][col:]
                    elif n == 1:
                        lines[row][:col] = " " * min(col, len(lines[row]))
                    else:
                        lines[row] = []
                while row >= len(lines):
                    lines.append([])
            continue
        ch = raw[pos]
        pos += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            while row >= len(lines):
                lines.append([])
        elif ch == "\b":
            col = max(0, col - 1)
        elif ch == "\t":
            col = (col // 8 + 1) * 8
        elif ch >= " " or ch == "\x1b":
            if ch != "\x1b":
                put(ch)
    text = [("".join(line)).rstrip() for line in lines]
    while text and not text[-1]:
        text.pop()
    return "\n".join(text)


if __name__ == "__main__":  # python tests/ptyrun.py synreal demo: the screen at the end, then its size
    import sys

    started = time.monotonic()
    code, text = run_pty(sys.argv[1:], timeout=24 * 3600)
    print(text)
    print(f"--- exit {code}, {len(text.splitlines())} lines on the screen, {time.monotonic() - started:.0f} s")
