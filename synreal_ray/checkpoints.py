"""What a checkpoint is, in one place (train writes them; translate, segment and seg-eval read them).

A checkpoint is a folder holding `state.pt` (torch.save of a dict) and `meta.json`. The writer
saves state.pt first and meta.json last, with state.pt's size in it ("state_bytes"), so a
checkpoint is **complete** when meta.json exists and state.pt has that size: a folder that is
being written, or was partly copied or uploaded, is not one. Ray Train keeps a run's checkpoints
as `checkpoint_NNNNNNNN` folders in the run folder. Local or s3://.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from synreal_ray import storage

STATE, META = "state.pt", "meta.json"


def read_meta(checkpoint: str) -> dict:
    try:
        return storage.read_json(storage.join(checkpoint, META))
    except json.JSONDecodeError as e:
        raise ValueError(f"{checkpoint}/{META}: not valid JSON: {e}") from None


def read_state(checkpoint: str, map_location: Any = "cpu") -> dict:
    """state.pt of a checkpoint as a dict."""
    import torch

    data = storage.read_bytes(storage.join(checkpoint, STATE))
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def is_complete(folder: str) -> bool:
    """meta.json present and state.pt of the size it records (see the module doc)."""
    try:
        want = read_meta(folder).get("state_bytes")
    except (FileNotFoundError, ValueError):
        return False
    return want is not None and storage.size(storage.join(folder, STATE)) == int(want)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def list_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, uri) of the complete checkpoints in a Ray run folder, oldest first."""
    found = [(int(m[1]), storage.join(run, name)) for name in storage.list_dirs(run)
             if (m := re.fullmatch(r"checkpoint_(\d+)", name))]
    return [(s, u) for s, u in sorted(found) if is_complete(u)]


def resume_point(run: str) -> tuple[int, str | None]:
    """(step, checkpoint uri) to start from: the newest complete checkpoint, or (0, None)."""
    found = list_checkpoints(run)
    return found[-1] if found else (0, None)
