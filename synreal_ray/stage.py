"""A stage is a function from input URIs and settings to one output URI.

`Stage.begin()` decides what happens to the output folder, in this order:

1. **Guard.** The output may not be empty, `.`, the current or home directory, `/`, a bucket
   without a prefix, nor equal, contain or lie inside any of the stage's inputs (datasets,
   checkpoints, upstream outputs). Anything else already there must carry this project's marker
   (`_synreal_stage.json`, written first by `begin`): a folder without it is never cleared.
2. **Lease.** `_lease.json` (host, pid, time) makes the run the only writer; a second run on the
   same output refuses with the holder's name. A lease whose process is gone (same host) is taken
   over; one from another host needs `force`.
3. **Skip.** A published output (`_SUCCESS`) with the same fingerprint is reused: that is how a
   pipeline resumes after a failure and how sweep trials share work.
4. **Resume or start over.** A resumable stage (train, translate) keeps its partial output only when
   the marker records the same *run* fingerprint; otherwise the folder is cleared and started anew.
   A stage whose partial output is expensive (training checkpoints) refuses to clear it without
   `force`.

`publish()` writes `stage.json` (settings, fingerprint, counts, timings, metrics), then `_SUCCESS`
last, then gives the lease back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from synreal_ray import storage

log = logging.getLogger(__name__)

STAGE_JSON = "stage.json"
MARKER = "_synreal_stage.json"  # written first: this folder is a stage output, and which run it holds
LEASE = "_lease.json"  # the one process writing it now


class OutputError(ValueError):
    """An output location the stage must not write to or clear."""


# --- fingerprints ----------------------------------------------------------------------------

def input_identity(uri: str) -> str:
    """What an input stands for in a fingerprint. A published stage output: its own fingerprint
    and the id of the run that published it (a change upstream, or the same settings computed
    again with --force, invalidates everything downstream). A raw file or folder: its path with the
    size and modification time of every file in it (S3: size and LastModified), so replacing a
    dataset's files in place is noticed."""
    meta = storage.join(uri, STAGE_JSON)
    if storage.is_complete(uri) and storage.exists(meta):
        info = storage.read_json(meta)
        return f"{info['fingerprint']}:{info.get('run_id', '')}"
    h = hashlib.sha256(str(uri).encode())
    for rel, size, mtime in storage.listing(uri):
        h.update(f"\n{rel}|{size}|{mtime}".encode())
    return f"{uri}#{h.hexdigest()[:16]}"


def fingerprint(settings: dict, inputs: list[str] | None = None) -> str:
    """Hash of a stage's settings and of its inputs' identities (see `input_identity`)."""
    parts = [json.dumps(settings, sort_keys=True, default=str)]
    parts += [input_identity(uri) for uri in inputs or []]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_info(out: str) -> dict:
    return storage.read_json(storage.join(out, STAGE_JSON))


# --- the output guard ------------------------------------------------------------------------

def _norm(uri: str) -> tuple[str, str]:
    """(scheme, normalised path) for comparing locations."""
    uri = str(uri)
    if storage.is_s3(uri):
        return "s3", "/" + "/".join(p for p in uri[len("s3://"):].split("/") if p)
    return "file", os.path.realpath(os.path.expanduser(uri))


def _inside(a: str, b: str) -> bool:
    """Path a equals b or lies inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_output(out: str, inputs: list[str] = (), what: str = "--out") -> None:
    """Refuse an output location that a clear-and-rewrite could turn into data loss."""
    text = str(out).strip()
    if not text:
        raise OutputError(f"{what} is empty (an unset variable?): refusing to write or clear it")
    scheme, path = _norm(text)
    if scheme == "s3":
        if path.count("/") < 2:
            raise OutputError(f"{text}: {what} is a whole bucket; give a prefix inside it (s3://bucket/prefix)")
    else:
        forbidden = {"/": "the filesystem root", os.path.realpath(os.getcwd()): "the current directory",
                     os.path.realpath(os.path.expanduser("~")): "the home directory"}
        if path in forbidden:
            raise OutputError(f"{text}: {what} is {forbidden[path]}; refusing to write or clear it")
    for inp in inputs:
        if not inp:
            continue
        s, p = _norm(inp)
        if s != scheme:
            continue
        if _inside(path, p):
            raise OutputError(f"{text}: {what} is {'the' if path == p else 'inside the'} input {inp}; "
                              "choose an output folder of its own")
        if _inside(p, path):
            raise OutputError(f"{text}: {what} contains the input {inp}; choose an output folder of its own")


# --- the stage -------------------------------------------------------------------------------

@dataclass
class Stage:
    """Start/publish helper for one stage run. `begin()` says whether there is work to do.

    inputs:   URIs the output depends on and must not overlap (fingerprinted, see `input_identity`)
    run_settings: for a stage that can continue an interrupted run, the settings that identify the
              run (train leaves out `steps`: more steps continue it); None: never resumes
    run_inputs: the inputs that identify the run (default: all of `inputs`); translate leaves the
              dataset's file times out, so fixing one bad image resumes instead of starting over
    precious: the partial output is expensive to make again (checkpoints): clearing it needs force
    """

    name: str
    out: str
    settings: dict
    inputs: list[str] = field(default_factory=list)
    run_settings: dict | None = None
    run_inputs: list[str] | None = None
    precious: bool = False
    fp: str = ""
    run_fp: str = ""
    started: float = 0.0
    resumed: bool = False

    def begin(self, force: bool = False, resume: bool = True) -> bool:
        """Guard, lease, then: False when the published output is up to date; True when there is
        work to do, with the output either kept (a resumed run: `self.resumed`) or cleared."""
        check_output(self.out, self.inputs)
        self.started = time.time()
        self.fp = fingerprint(self.settings, self.inputs)
        run_inputs = self.inputs if self.run_inputs is None else self.run_inputs
        self.run_fp = fingerprint(self.run_settings, run_inputs) if self.run_settings is not None else ""
        marker = self._marker()
        self._take_lease(force)
        try:
            return self._decide(marker, force, resume)
        except BaseException:
            self.release()
            raise

    def _decide(self, marker: dict | None, force: bool, resume: bool) -> bool:
        if not force and storage.is_complete(self.out) and read_info(self.out).get("fingerprint") == self.fp:
            self.release()
            return False
        held = marker is not None and self._holds_data()
        if held and self.run_settings is not None and resume and not force and marker.get("run_fp") == self.run_fp:
            self._withdraw_success()  # while it runs, the output must not look complete
            self.resumed = True
            log.info("%s: continuing the interrupted %s run", self.out, self.name)
            return True
        if held and self.precious and not force:
            if marker.get("run_fp") == self.run_fp:
                hint = "pass --resume (resume: true) to continue it, or --force to delete it and start over"
                raise OutputError(f"{self.out}: holds a {self.name} run with these settings; {hint}")
            raise OutputError(f"{self.out}: holds a {self.name} run with other settings "
                              f"({_settings_diff(marker.get('run_settings') or {}, self.run_settings or {})}); "
                              "use another output, or --force to delete it and start over")
        self._clear()
        return True

    # --- marker: written first, read to decide whether we may touch the folder ---

    def _marker(self) -> dict | None:
        """The marker's record; None for a missing or empty folder. Raises for a folder of data
        that this project did not write."""
        m = storage.join(self.out, MARKER)
        if storage.exists(m):
            return storage.read_json(m)
        if storage.exists(self.out) and not storage.is_dir(self.out):
            raise OutputError(f"{self.out}: exists and is a file, not an output folder")
        found = [u for u in storage.list_files(self.out) if os.path.basename(u) != LEASE]
        if found:
            raise OutputError(f"{self.out}: is not empty and was not written by synreal-ray (no {MARKER}; "
                              f"e.g. {found[0]}); refusing to clear it: choose another output or empty it yourself")
        return None

    def _holds_data(self) -> bool:
        return any(os.path.basename(u) not in (MARKER, LEASE) for u in storage.list_files(self.out))

    def _clear(self) -> None:
        storage.clear_dir(self.out, keep=(LEASE,))
        storage.write_json(storage.join(self.out, MARKER), {
            "stage": self.name, "run_fp": self.run_fp, "fingerprint": self.fp,
            "run_settings": self.run_settings, "created": time.time()})

    def _withdraw_success(self) -> None:
        if storage.is_complete(self.out):
            storage.delete_file(storage.join(self.out, storage.SUCCESS))

    # --- lease: one writer per output ---

    def _take_lease(self, force: bool) -> None:
        uri = storage.join(self.out, LEASE)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if storage.exists(uri) and not force:
            try:
                held = storage.read_json(uri)
            except (ValueError, FileNotFoundError):
                held = None
            if held and {k: held.get(k) for k in me} != me and not _stale(held):
                raise OutputError(
                    f"{self.out}: another run is writing here (host {held.get('host')}, pid {held.get('pid')}, "
                    f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('time', 0)))}); "
                    "wait for it, or pass --force if that run is dead")
            if held and {k: held.get(k) for k in me} != me:
                log.warning("%s: taking over the lease of a process that is gone (pid %s)", self.out, held.get("pid"))
        storage.write_json(uri, {**me, "time": time.time(), "stage": self.name})
        held = storage.read_json(uri)  # two runs that started together: the last write wins, the other stops
        if {k: held.get(k) for k in me} != me:
            raise OutputError(f"{self.out}: another run (host {held.get('host')}, pid {held.get('pid')}) took "
                              "this output at the same moment")

    def release(self) -> None:
        uri = storage.join(self.out, LEASE)
        try:
            held = storage.read_json(uri)
        except (ValueError, FileNotFoundError):
            return
        if (held.get("host"), held.get("pid")) == (socket.gethostname(), os.getpid()):
            storage.delete_file(uri)

    def publish(self, **info) -> dict:
        record = {
            "stage": self.name,
            "fingerprint": self.fp,
            "settings": self.settings,
            "inputs": self.inputs,
            "seconds": round(time.time() - self.started, 3),
            "run_id": uuid.uuid4().hex[:12],
            **info,
        }
        storage.write_json(storage.join(self.out, STAGE_JSON), record)
        storage.write_bytes(storage.join(self.out, storage.SUCCESS), b"")
        self.release()
        return record


def _stale(lease: dict) -> bool:
    """A lease from this host whose process no longer exists."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def _settings_diff(old: dict, new: dict, most: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:most]]
    return ", ".join(shown) + (f" and {len(keys) - most} more" if len(keys) > most else "") if keys else "same settings, other inputs"
