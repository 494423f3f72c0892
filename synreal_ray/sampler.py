"""Smart batch sampler: (synthetic, real) training pairs from the SP-Feat pairs table.

Paper 000, section 3.2.1: a discriminator that sees a synthetic batch full of pedestrians next to a
real batch with none learns layout instead of appearance. Pairing each synthetic image with one
of its K nearest real layouts removes that signal. A share of the real slots still takes a uniformly
random real image, so real images that are nobody's neighbour reach the discriminator too.

Plain Python + numpy (no Ray, no torch), so training on any framework can use it, and its whole
sequence is a function of (seed, inputs): `state_dict()` / `load_state_dict()` resume it exactly.

Modes:
  pairing   "spfeat": draw a synthetic image, then one of its neighbours uniformly over its ranks.
            "random": every real image uniformly at random (unpaired GAN baseline).
  weighting "loss":     loss weights w_syn / w_real per sample; draws uniform.
            "sampling": synthetic images drawn with replacement with probability ∝ w_syn (random
                        reals ∝ w_real); loss weights all 1.
            "none":     uniform draws, loss weights all 1.
In "loss" and "none" modes an epoch is one pass over the synthetic images in a fresh shuffled
order (without replacement); in "sampling" mode it is n_syn draws.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

PAIRINGS = ("spfeat", "random")
WEIGHTINGS = ("loss", "sampling", "none")
_STATE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Batch:
    """One training batch: slot i pairs syn_ids[i] with real_ids[i]; w_* are loss weights."""

    syn_ids: list[str]
    real_ids: list[str]
    w_syn: np.ndarray  # float32 (batch_size,)
    w_real: np.ndarray  # float32 (batch_size,)
    real_random: np.ndarray  # bool: the real image was drawn at random, not as a neighbour

    def to_dict(self) -> dict[str, Any]:
        return {
            "syn_ids": self.syn_ids,
            "real_ids": self.real_ids,
            "w_syn": self.w_syn,
            "w_real": self.w_real,
            "real_random": self.real_random,
        }

    def __len__(self) -> int:
        return len(self.syn_ids)


def _column(table: Any, name: str, required: bool) -> np.ndarray | None:
    """A column of a dict of arrays, pandas DataFrame or pyarrow Table, as a numpy array."""
    try:
        col = table[name]
    except (KeyError, IndexError, TypeError):
        if required:
            raise ValueError(f"pairs table has no column {name!r}") from None
        return None
    return np.asarray(col)


def _check_weights(w: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} must be finite and >= 0: {str(ids[i])!r} has {w[i]}")
    return w


def _weights_from_dict(weights: Mapping[str, float], ids: np.ndarray, what: str) -> np.ndarray:
    missing = [i for i in ids if i not in weights]
    if missing:
        raise ValueError(f"{what}: {len(missing)} ids have no weight, e.g. {missing[:3]}")
    return _check_weights(np.array([weights[i] for i in ids], dtype=np.float64), ids, what)


def _weights_from_table(
    w: np.ndarray | None, inv: np.ndarray, ids: np.ndarray, n: int, what: str
) -> np.ndarray:
    """Per-id weights from a per-row column; every row of one id must carry the same weight."""
    out = np.ones(n, dtype=np.float64)
    if w is None:
        return out
    w = _check_weights(w, ids[inv], what)
    out[inv] = w
    differs = w != out[inv]
    if differs.any():
        raise ValueError(f"{what} differs between rows of the same id {str(ids[inv[np.flatnonzero(differs)[0]]])!r}")
    return out


class SmartBatchSampler:
    """Infinite, seeded, resumable iterator of `Batch`es.

    pairs:        the pairs table (dict of columns, DataFrame or pyarrow Table) with syn_id, real_id
                  and optionally rank (neighbour order; else row order), w_syn, w_real (else 1).
                  Required for pairing="spfeat"; for "random" it may supply the ids and weights.
    syn_ids:      all synthetic ids. With "random" pairing, the images to draw (default: those in
                  pairs). With "spfeat" only the ids in pairs can be drawn (they have neighbours).
    real_ids:     all real ids: where random real slots draw from. Pass it in spfeat mode too: by
                  default only the reals in pairs are known, and reals that are nobody's neighbour
                  could then never be seen.
    syn_weights, real_weights: id -> weight; override the table's; must cover every id drawn.
                  Reals that are in neither get weight 1.
    batch_size, pairing, weighting: see the module docstring.
    real_random_share: probability that a slot's real image is drawn at random instead of being
                  the neighbour (spfeat only; "random" pairing draws every real at random).
    seed:         non-negative int; the sequence depends only on it and on the inputs' content
                  (not on row order), so a re-written pairs table gives the same batches.
    """

    def __init__(
        self,
        pairs: Any = None,
        *,
        syn_ids: Sequence[str] | None = None,
        real_ids: Sequence[str] | None = None,
        syn_weights: Mapping[str, float] | None = None,
        real_weights: Mapping[str, float] | None = None,
        batch_size: int,
        pairing: str = "spfeat",
        weighting: str = "loss",
        real_random_share: float = 0.1,
        seed: int = 0,
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}: use one of {', '.join(PAIRINGS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        share = float(real_random_share)
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise ValueError(f"real_random_share must be in [0, 1], got {real_random_share!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if pairing == "spfeat" and pairs is None:
            raise ValueError("pairing='spfeat' needs the pairs table")
        self.batch_size = int(batch_size)
        self.pairing = pairing
        self.weighting = weighting
        self.real_random_share = share if pairing == "spfeat" else 1.0
        self._build(pairs, syn_ids, real_ids, syn_weights, real_weights)
        self._reset(int(seed))

    # ----------------------------------------------------------------------------------- setup

    def _build(self, pairs, syn_ids, real_ids, syn_weights, real_weights) -> None:
        p_syn = p_real = p_rank = p_wsyn = p_wreal = None
        if pairs is not None:
            p_syn = _column(pairs, "syn_id", True).astype(str)
            p_real = _column(pairs, "real_id", True).astype(str)
            if p_syn.size == 0:
                raise ValueError("pairs table is empty")
            p_rank, p_wsyn, p_wreal = (_column(pairs, c, False) for c in ("rank", "w_syn", "w_real"))
            for name, col in (("real_id", p_real), ("rank", p_rank), ("w_syn", p_wsyn), ("w_real", p_wreal)):
                if col is not None and len(col) != len(p_syn):
                    raise ValueError(f"pairs column {name!r} has {len(col)} rows, syn_id has {len(p_syn)}")

        # Sorted unique ids: the sequence must not depend on the order rows were written in.
        if self.pairing == "random" and syn_ids is not None:
            syn = np.unique(np.asarray(syn_ids, dtype=str))
        else:  # spfeat draws only synthetic images that have neighbours
            syn = np.unique(p_syn) if p_syn is not None else np.array([], dtype=str)
        if real_ids is not None:
            real = np.unique(np.asarray(real_ids, dtype=str))
        else:
            real = np.unique(p_real) if p_real is not None else np.array([], dtype=str)
        for given, col, what in ((syn_ids, p_syn, "syn"), (real_ids, p_real, "real")):
            if given is not None and col is not None:
                unknown = np.setdiff1d(col, np.asarray(given, dtype=str))
                if unknown.size:
                    raise ValueError(
                        f"{unknown.size} {what}_id values in pairs are not in {what}_ids, e.g. {unknown[:3].tolist()}"
                    )
        if syn.size == 0:
            raise ValueError("no synthetic ids to sample from")
        if real.size == 0:
            raise ValueError("no real ids to sample from")
        self._syn_ids, self._real_ids = syn, real

        w_syn = np.ones(syn.size)
        w_real = np.ones(real.size)
        if p_syn is not None:
            s_idx = np.searchsorted(syn, p_syn)
            r_idx = np.searchsorted(real, p_real)
            w_syn = _weights_from_table(p_wsyn, s_idx, syn, syn.size, "w_syn")
            w_real = _weights_from_table(p_wreal, r_idx, real, real.size, "w_real")
        if syn_weights is not None:
            w_syn = _weights_from_dict(syn_weights, syn, "syn_weights")
        if real_weights is not None:
            w_real = _weights_from_dict(real_weights, real, "real_weights")
        self._w_syn, self._w_real = w_syn, w_real
        if self.weighting == "sampling":
            if w_syn.sum() <= 0:
                raise ValueError("weighting='sampling' but every synthetic weight is 0")
            if self.real_random_share > 0 and w_real.sum() <= 0:
                raise ValueError("weighting='sampling' draws random reals ∝ w_real, but every real weight is 0")

        if self.pairing == "spfeat":
            # Neighbours of synthetic image s: _nb_real[_nb_start[s] : _nb_start[s] + _nb_count[s]], by rank.
            rank = np.arange(p_syn.size) if p_rank is None else np.asarray(p_rank, dtype=np.float64)
            order = np.lexsort((r_idx, rank, s_idx))
            s_sorted, r_sorted = s_idx[order], r_idx[order]
            dup = (s_sorted[1:] == s_sorted[:-1]) & (r_sorted[1:] == r_sorted[:-1])
            if dup.any():
                i = int(np.flatnonzero(dup)[0])
                raise ValueError(f"pairs table repeats the pair ({str(syn[s_sorted[i]])!r}, {str(real[r_sorted[i]])!r})")
            self._nb_real = r_sorted
            self._nb_count = np.bincount(s_sorted, minlength=syn.size)
            self._nb_start = np.concatenate([[0], np.cumsum(self._nb_count)[:-1]])
        else:
            self._nb_real = self._nb_count = self._nb_start = np.zeros(0, dtype=np.int64)

        self._syn_cum = (np.cumsum(w_syn), int(np.flatnonzero(w_syn > 0)[-1]) if w_syn.any() else 0)
        self._real_cum = (np.cumsum(w_real), int(np.flatnonzero(w_real > 0)[-1]) if w_real.any() else 0)
        self._fingerprint = self._config_fingerprint()

    def _config_fingerprint(self) -> dict[str, Any]:
        """What a saved state is only valid for: the modes and a hash of the data."""
        h = hashlib.sha256()
        for arr in (self._syn_ids, self._real_ids):
            h.update("\0".join(arr.tolist()).encode())
            h.update(b"\1")
        for arr in (self._w_syn, self._w_real, self._nb_real, self._nb_count):
            h.update(np.ascontiguousarray(arr).tobytes())
        return {
            "pairing": self.pairing,
            "weighting": self.weighting,
            "batch_size": self.batch_size,
            "real_random_share": self.real_random_share,
            "n_syn": int(self._syn_ids.size),
            "n_real": int(self._real_ids.size),
            "data_sha256": h.hexdigest(),
        }

    def _reset(self, seed: int) -> None:
        self.seed = seed
        self._epoch = 0
        self._position = 0
        self._steps = 0
        # Independent streams: draws (neighbours, random reals, weighted syn) and per-epoch orders.
        self._rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # ----------------------------------------------------------------------------------- sizes

    @property
    def n_syn(self) -> int:
        return int(self._syn_ids.size)

    @property
    def n_real(self) -> int:
        return int(self._real_ids.size)

    @property
    def epoch(self) -> int:
        """Completed epochs (passes over the synthetic images)."""
        return self._epoch

    @property
    def steps(self) -> int:
        """Batches produced so far."""
        return self._steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_syn / self.batch_size)

    # ----------------------------------------------------------------------------------- draws

    def _permutation(self) -> np.ndarray:
        # A function of (seed, epoch) alone, so a restored state needs no stored permutation.
        if self._perm_epoch != self._epoch:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, self._epoch)))
            self._perm = rng.permutation(self.n_syn)
            self._perm_epoch = self._epoch
        return self._perm

    def _weighted(self, cum: tuple[np.ndarray, int], size: int) -> np.ndarray:
        """Indices drawn with replacement with probability ∝ weight; cum = (cumulative weights,
        index of the last positive weight)."""
        cumsum, last = cum
        idx = np.searchsorted(cumsum, self._rng.random(size) * cumsum[-1], side="right")
        # u * total can round up to total: the last positive weight is then the right answer.
        return np.minimum(idx, last)

    def _draw_syn(self, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:
            take = min(size - filled, self.n_syn - self._position)
            if self.weighting == "sampling":
                out[filled : filled + take] = self._weighted(self._syn_cum, take)
            else:
                out[filled : filled + take] = self._permutation()[self._position : self._position + take]
            filled += take
            self._position += take
            if self._position == self.n_syn:
                self._epoch += 1
                self._position = 0
        return out

    def _draw_real_random(self, size: int) -> np.ndarray:
        if self.weighting == "sampling":
            return self._weighted(self._real_cum, size)
        return self._rng.integers(0, self.n_real, size)

    def next_batch(self) -> Batch:
        """The next batch; advances `steps`, and `epoch` when a pass over the synthetic set ends."""
        size = self.batch_size
        syn = self._draw_syn(size)
        if self.pairing == "spfeat":
            random_slot = self._rng.random(size) < self.real_random_share
            real = self._nb_real[self._nb_start[syn] + self._rng.integers(0, self._nb_count[syn])]
            if random_slot.any():
                real = np.where(random_slot, self._draw_real_random(size), real)
        else:
            random_slot = np.ones(size, dtype=bool)
            real = self._draw_real_random(size)
        if self.weighting == "loss":
            w_syn = self._w_syn[syn].astype(np.float32)
            w_real = self._w_real[real].astype(np.float32)
        else:
            w_syn = np.ones(size, dtype=np.float32)
            w_real = np.ones(size, dtype=np.float32)
        self._steps += 1
        return Batch(self._syn_ids[syn].tolist(), self._real_ids[real].tolist(), w_syn, w_real, random_slot)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the sequence; `load_state_dict` continues from it."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "steps": self._steps,
            "rng": self._rng.bit_generator.state,
            "config": dict(self._fingerprint),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state` was taken. The sampler must be built from the same data
        and modes (checked: a mismatch raises ValueError naming what differs); the seed is taken
        from the state."""
        missing = {"version", "seed", "epoch", "position", "steps", "rng", "config"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"sampler state version {state['version']} is not {_STATE_VERSION}")
        differs = [k for k, v in self._fingerprint.items() if state["config"].get(k) != v]
        if differs:
            raise ValueError(
                "sampler state was saved for a different sampler: "
                + ", ".join(f"{k} {state['config'].get(k)!r} != {self._fingerprint[k]!r}" for k in differs)
            )
        if not 0 <= int(state["position"]) < self.n_syn:
            raise ValueError(f"sampler state position {state['position']} is outside [0, {self.n_syn})")
        self._reset(int(state["seed"]))
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._steps = int(state["steps"])
        self._rng.bit_generator.state = state["rng"]
