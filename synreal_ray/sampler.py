"""Smart batch sampler: (synthetic, real) training pairs from the SP-Feat pairs table.

Paper 000, section 3.2.1: a discriminator that sees a synthetic batch full of pedestrians next to a
real batch with none learns layout instead of appearance. Pairing each image with one of its K
nearest layouts of the other domain removes that signal.

Plain Python + numpy (no Ray, no torch), so training on any framework can use it, and its whole
sequence is a function of (seed, inputs): `state_dict()` / `load_state_dict()` resume it exactly.

Which side an epoch walks over follows the direction of the pairs (`query`, by default read off
the table: a `w_use` column means query "real"):
  query "real" (the paper; `synreal pairs` default): an epoch visits every real image that has
            neighbours once, in a seeded shuffled order, and gives each ONE of its synthetic
            neighbours, drawn with probability ∝ w_use (1 / the number of real lists the
            synthetic image is in), so over-used synthetic images are not over-drawn. Real images
            are drawn uniformly, synthetic ones roughly uniformly over the covered ones.
            `real_random_share` does not apply (every real image is already visited).
  query "syn" (pairs tables from before issue 12, or `--query syn`): an epoch visits every
            synthetic image once and gives it one of its real neighbours uniformly over its ranks;
            a share `real_random_share` of the real slots takes a uniformly random real image
            instead, so real images that are nobody's neighbour reach the discriminator too.
            Real images are then drawn ∝ how many synthetic lists hold them (≈ p_syn / p_real).

Pairing: "spfeat" (the above) or "random": every real image uniformly at random (unpaired GAN
baseline; the epoch walks the synthetic images).

Weighting (KLIEP weights ω = w_syn ≈ p_real/p_syn, ψ = w_real ≈ p_syn/p_real; paper 001):
  "loss":     eq. 12: loss weights ω on the synthetic terms, ψ on the real terms; draws unweighted.
  "source":   eq. 13: loss weight ω on the synthetic side only; w_real all 1; draws unweighted.
  "sampling": draws weighted instead of the loss (loss weights all 1): the epoch's side is drawn
              with replacement ∝ its weight (query syn: ω, random reals ∝ ψ; query real: real
              images ∝ ψ, each one's synthetic neighbour ∝ w_use · ω); an epoch is then as many
              draws as that side has images.
  "none":     loss weights all 1, draws unweighted (w_use still applies: it is part of pairing).
With query-real pairing the real images are drawn uniformly, so ψ is applied exactly once, by the
loss ("loss"); nothing else shifts the real side. Note what eq. 12 does to a discriminator: it
sees real images weighted by ψ (re-weighted toward p_syn) and fakes translated from synthetic
images weighted by ω (toward p_real), so its two sides are pushed toward different distributions;
"source" (eq. 13) leaves the real side at p_real, the distribution the weighted fakes follow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PAIRINGS = ("spfeat", "random")
WEIGHTINGS = ("loss", "source", "sampling", "none")
QUERIES = ("real", "syn")
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


def _columns_of(table: Any) -> list[str]:
    """Column names of a dict of arrays, pandas DataFrame or pyarrow Table."""
    for attr in ("column_names", "columns"):  # pyarrow, pandas
        if hasattr(table, attr):
            return list(getattr(table, attr))
    return list(table.keys())


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


def pairs_query(columns) -> str:
    """Direction of a pairs table from its column names: "real" (each real image's synthetic
    neighbours, with the over-use weight w_use) or "syn" (each synthetic image's real neighbours)."""
    return "real" if "w_use" in columns else "syn"


def _cum(w: np.ndarray) -> tuple[np.ndarray, int]:
    """(cumulative weights, index of the last positive weight) for `_weighted`."""
    return np.cumsum(w), int(np.flatnonzero(w > 0)[-1]) if w.any() else 0


class SmartBatchSampler:
    """Infinite, seeded, resumable iterator of `Batch`es.

    pairs:        the pairs table (dict of columns, DataFrame or pyarrow Table) with syn_id, real_id
                  and optionally rank (neighbour order; else row order), w_syn, w_real (else 1),
                  w_use (query "real": the over-use weight; else 1).
                  Required for pairing="spfeat"; for "random" it may supply the ids and weights.
    query:        "real" or "syn" (see the module docstring); None: `pairs_query` of the table.
    syn_ids:      all synthetic ids. With "random" pairing, the images to draw (default: those in
                  pairs). With "spfeat" only the ids in pairs can be drawn (they have neighbours).
    real_ids:     all real ids: where random real slots draw from (query syn). Pass it in spfeat
                  mode too: by default only the reals in pairs are known, and reals that are
                  nobody's neighbour could then never be seen. With query real only the reals in
                  pairs are visited (the others have no neighbour left).
    syn_weights, real_weights: id -> weight; override the table's; must cover every id drawn.
                  Reals that are in neither get weight 1.
    batch_size, pairing, weighting: see the module docstring.
    real_random_share: probability that a slot's real image is drawn at random instead of being
                  the neighbour (spfeat with query syn only; "random" pairing draws every real at
                  random; query real visits every real image and ignores it).
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
        query: str | None = None,
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
        if query is not None and query not in QUERIES:
            raise ValueError(f"unknown query {query!r}: use one of {', '.join(QUERIES)}")
        if pairing == "random":
            query = "syn"
        elif query is None:
            query = pairs_query(_columns_of(pairs))
        self.batch_size = int(batch_size)
        self.pairing = pairing
        self.weighting = weighting
        self.query = query
        self.real_random_share = {"random": 1.0, "syn": share, "real": 0.0}["random" if pairing == "random" else query]
        self._build(pairs, syn_ids, real_ids, syn_weights, real_weights)
        self._reset(int(seed))

    # ----------------------------------------------------------------------------------- setup

    def _build(self, pairs, syn_ids, real_ids, syn_weights, real_weights) -> None:
        p_syn = p_real = p_rank = p_wsyn = p_wreal = p_wuse = None
        if pairs is not None:
            p_syn = _column(pairs, "syn_id", True).astype(str)
            p_real = _column(pairs, "real_id", True).astype(str)
            if p_syn.size == 0:
                raise ValueError("pairs table is empty")
            p_rank, p_wsyn, p_wreal, p_wuse = (_column(pairs, c, False) for c in ("rank", "w_syn", "w_real", "w_use"))
            for name, col in (("real_id", p_real), ("rank", p_rank), ("w_syn", p_wsyn), ("w_real", p_wreal),
                              ("w_use", p_wuse)):
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
        # The anchors: the side an epoch walks over (indices into syn, or into real for query real).
        by_real = self.pairing == "spfeat" and self.query == "real"
        self._anchors = np.unique(r_idx) if by_real else np.arange(syn.size)
        anchor_w = w_real[self._anchors] if by_real else w_syn
        if self.weighting == "sampling":
            if anchor_w.sum() <= 0:
                raise ValueError(f"weighting='sampling' but every {'real' if by_real else 'synthetic'} weight is 0")
            if self.real_random_share > 0 and w_real.sum() <= 0:
                raise ValueError("weighting='sampling' draws random reals ∝ w_real, but every real weight is 0")

        self._nb_w = np.zeros(0)
        if self.pairing == "spfeat":
            # Neighbours of anchor a (query syn: a synthetic image; query real: a real image):
            # _nb_other[_nb_start[a] : _nb_start[a] + _nb_count[a]], by rank.
            rank = np.arange(p_syn.size) if p_rank is None else np.asarray(p_rank, dtype=np.float64)
            a_idx, o_idx = (r_idx, s_idx) if by_real else (s_idx, r_idx)
            order = np.lexsort((o_idx, rank, a_idx))
            a_sorted, o_sorted = a_idx[order], o_idx[order]
            dup = (a_sorted[1:] == a_sorted[:-1]) & (o_sorted[1:] == o_sorted[:-1])
            if dup.any():
                i = int(np.flatnonzero(dup)[0])
                s_i, r_i = (o_sorted[i], a_sorted[i]) if by_real else (a_sorted[i], o_sorted[i])
                raise ValueError(f"pairs table repeats the pair ({str(syn[s_i])!r}, {str(real[r_i])!r})")
            self._nb_other = o_sorted
            self._nb_count = np.bincount(a_sorted, minlength=real.size if by_real else syn.size)
            self._nb_start = np.concatenate([[0], np.cumsum(self._nb_count)[:-1]])
            if by_real:
                self._build_neighbour_weights(p_wuse, s_idx, syn, o_sorted, a_sorted)
        else:
            self._nb_other = self._nb_count = self._nb_start = np.zeros(0, dtype=np.int64)

        self._anchor_cum = _cum(anchor_w)
        self._real_cum = _cum(w_real)
        self._fingerprint = self._config_fingerprint()

    def _build_neighbour_weights(self, p_wuse, s_idx, syn, o_sorted, a_sorted) -> None:
        """Query real: each row's draw weight, w_use (· w_syn in sampling mode), kept as a running
        sum over the rows (_nb_cum) and, per real image, its last row of positive weight (_nb_last).
        A real image whose neighbours all weigh 0 draws among them uniformly."""
        w_use = _weights_from_table(p_wuse, s_idx, syn, syn.size, "w_use")
        w = w_use[o_sorted] * (self._w_syn[o_sorted] if self.weighting == "sampling" else 1.0)
        total = np.bincount(a_sorted, weights=w, minlength=self._nb_count.size)
        w = np.where(total[a_sorted] > 0, w, 1.0)
        self._nb_w = w
        self._nb_cum = np.cumsum(w)
        self._nb_last = np.zeros(self._nb_count.size, dtype=np.int64)
        np.maximum.at(self._nb_last, a_sorted[w > 0], np.flatnonzero(w > 0))

    def _config_fingerprint(self) -> dict[str, Any]:
        """What a saved state is only valid for: the modes and a hash of the data."""
        h = hashlib.sha256()
        for arr in (self._syn_ids, self._real_ids):
            h.update("\0".join(arr.tolist()).encode())
            h.update(b"\1")
        for arr in (self._w_syn, self._w_real, self._nb_other, self._nb_count):
            h.update(np.ascontiguousarray(arr).tobytes())
        extra = {}
        if self.pairing == "spfeat" and self.query == "real":  # query syn: as before issue 12
            h.update(np.ascontiguousarray(self._nb_w).tobytes())
            extra["query"] = "real"
        return {
            **extra,
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
    def n_anchors(self) -> int:
        """Images an epoch walks over: the synthetic ones, or with query real the paired real ones."""
        return int(self._anchors.size)

    @property
    def epoch(self) -> int:
        """Completed epochs (passes over the anchors)."""
        return self._epoch

    @property
    def steps(self) -> int:
        """Batches produced so far."""
        return self._steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_anchors / self.batch_size)

    # ----------------------------------------------------------------------------------- draws

    def _permutation(self) -> np.ndarray:
        # A function of (seed, epoch) alone, so a restored state needs no stored permutation.
        if self._perm_epoch != self._epoch:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, self._epoch)))
            self._perm = rng.permutation(self.n_anchors)
            self._perm_epoch = self._epoch
        return self._perm

    def _weighted(self, cum: tuple[np.ndarray, int], size: int) -> np.ndarray:
        """Indices drawn with replacement with probability ∝ weight; cum = (cumulative weights,
        index of the last positive weight)."""
        cumsum, last = cum
        idx = np.searchsorted(cumsum, self._rng.random(size) * cumsum[-1], side="right")
        # u * total can round up to total: the last positive weight is then the right answer.
        return np.minimum(idx, last)

    def _draw_anchors(self, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:
            take = min(size - filled, self.n_anchors - self._position)
            if self.weighting == "sampling":
                out[filled : filled + take] = self._weighted(self._anchor_cum, take)
            else:
                out[filled : filled + take] = self._permutation()[self._position : self._position + take]
            filled += take
            self._position += take
            if self._position == self.n_anchors:
                self._epoch += 1
                self._position = 0
        return self._anchors[out]

    def _draw_syn_neighbour(self, real: np.ndarray) -> np.ndarray:
        """Query real: one synthetic neighbour of each real image, ∝ its row weight."""
        start, cum = self._nb_start[real], self._nb_cum
        base = np.where(start > 0, cum[start - 1], 0.0)
        total = cum[start + self._nb_count[real] - 1] - base
        pos = np.searchsorted(cum, base + self._rng.random(real.size) * total, side="right")
        # rounding can step outside the real image's rows: clamp to its first / last positive one
        return self._nb_other[np.clip(pos, start, self._nb_last[real])]

    def _draw_real_random(self, size: int) -> np.ndarray:
        if self.weighting == "sampling":
            return self._weighted(self._real_cum, size)
        return self._rng.integers(0, self.n_real, size)

    def next_batch(self) -> Batch:
        """The next batch; advances `steps`, and `epoch` when a pass over the anchors ends."""
        size = self.batch_size
        if self.pairing == "spfeat" and self.query == "real":
            real = self._draw_anchors(size)
            syn = self._draw_syn_neighbour(real)
            random_slot = np.zeros(size, dtype=bool)
        elif self.pairing == "spfeat":
            syn = self._draw_anchors(size)
            random_slot = self._rng.random(size) < self.real_random_share
            real = self._nb_other[self._nb_start[syn] + self._rng.integers(0, self._nb_count[syn])]
            if random_slot.any():
                real = np.where(random_slot, self._draw_real_random(size), real)
        else:
            syn = self._draw_anchors(size)
            random_slot = np.ones(size, dtype=bool)
            real = self._draw_real_random(size)
        ones = np.ones(size, dtype=np.float32)
        w_syn = self._w_syn[syn].astype(np.float32) if self.weighting in ("loss", "source") else ones
        w_real = self._w_real[real].astype(np.float32) if self.weighting == "loss" else ones.copy()
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
        saved, own = state["config"], self._fingerprint
        differs = [k for k in {**own, **saved} if saved.get(k) != own.get(k)]
        if differs:
            raise ValueError(
                "sampler state was saved for a different sampler: "
                + ", ".join(f"{k} {saved.get(k)!r} != {own.get(k)!r}" for k in differs)
            )
        if not 0 <= int(state["position"]) < self.n_anchors:
            raise ValueError(f"sampler state position {state['position']} is outside [0, {self.n_anchors})")
        self._reset(int(state["seed"]))
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._steps = int(state["steps"])
        self._rng.bit_generator.state = state["rng"]
