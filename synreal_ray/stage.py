"""A stage is a function from input URIs and settings to one output URI.

It clears any unpublished output, writes its objects, then publishes: `stage.json` (settings,
fingerprint, counts, timings, metrics) and `_SUCCESS` last. A published output with the same
fingerprint is reused instead of recomputed: that is how a pipeline resumes after a failure and
how sweep trials share work.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from synreal_ray import storage

STAGE_JSON = "stage.json"


def fingerprint(settings: dict, inputs: list[str] | None = None) -> str:
    """Hash of a stage's settings and of its inputs' identities.

    An input that is itself a published stage output contributes its own fingerprint, so a change
    upstream invalidates everything downstream.
    """
    parts = [json.dumps(settings, sort_keys=True, default=str)]
    for uri in inputs or []:
        meta = storage.join(uri, STAGE_JSON)
        parts.append(storage.read_json(meta)["fingerprint"] if storage.exists(meta) else str(uri))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_info(out: str) -> dict:
    return storage.read_json(storage.join(out, STAGE_JSON))


@dataclass
class Stage:
    """Start/publish helper for one stage run. `begin()` says whether there is work to do."""

    name: str
    out: str
    settings: dict
    inputs: list[str] = field(default_factory=list)
    fp: str = ""
    started: float = 0.0

    def begin(self, force: bool = False) -> bool:
        self.fp = fingerprint(self.settings, self.inputs)
        self.started = time.time()
        if not force and storage.is_complete(self.out):
            if read_info(self.out).get("fingerprint") == self.fp:
                return False
        # Anything here is either stale or the remains of a killed run: start from nothing.
        storage.delete_dir(self.out)
        storage.makedirs(self.out)
        return True

    def publish(self, **info) -> dict:
        record = {
            "stage": self.name,
            "fingerprint": self.fp,
            "settings": self.settings,
            "inputs": self.inputs,
            "seconds": round(time.time() - self.started, 3),
            **info,
        }
        storage.write_json(storage.join(self.out, STAGE_JSON), record)
        storage.write_bytes(storage.join(self.out, storage.SUCCESS), b"")
        return record
