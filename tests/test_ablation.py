"""The ablation view's two tables (synreal_ray.ablation): the runs side by side, and the KLIEP
importance cohorts. The cohort confusion against the consistency evaluation's own matrix is
checked on a real pipeline output in test_pipeline (identity translation)."""

import numpy as np
import pytest

from synreal_ray.ablation import cohort_table, cohorts, runs_table
from synreal_ray.pipeline import RunSpec


def test_cohorts_are_thirds_by_weight_ties_broken_by_id():
    w = {"g": 0.5, "a": 3.0, "c": 0.1, "b": 0.5, "e": 9.0, "d": 1.0, "f": 0.5}
    groups = cohorts(w)
    assert [g["cohort"] for g in groups] == ["low", "medium", "high"]
    assert [g["ids"] for g in groups] == [["c", "b", "f"], ["g", "d"], ["a", "e"]]  # 7 = 3 + 2 + 2
    assert [(g["w_min"], g["w_max"]) for g in groups] == [(0.1, 0.5), (0.5, 1.0), (3.0, 9.0)]
    assert sorted(i for g in groups for i in g["ids"]) == sorted(w)  # every image in exactly one cohort


def test_runs_table_takes_each_runs_row_of_every_metric():
    runs = [RunSpec("base", "cyclegan", "random", "none"), RunSpec("both", "cyclegan", "spfeat", "loss")]
    tables = {
        "consistency_miou": {"rows": [{"kind": "raw synthetic", "miou": 0.9}, {"kind": "run", "run": "base", "miou": 0.5},
                                      {"kind": "run", "run": "both", "miou": 0.6}, {"kind": "ceiling", "miou": 0.8}]},
        "fid": {"rows": [{"kind": "run", "run": "base", "fid": 3.0}, {"kind": "run vs synthetic", "run": "base", "fid": 7.0},
                         {"kind": "run", "run": "both", "fid": 2.0}]},
        "kid": {"rows": [{"kind": "run", "run": "base", "kid": 0.003, "kid_std": 0.001},
                         {"kind": "run", "run": "both", "kid": 0.002, "kid_std": 0.0005}]},
    }
    rows = runs_table(runs, tables)["rows"]
    assert [(r["comparison"], r["pairing"], r["weighting"]) for r in rows] == [("base", "random", "none"),
                                                                               ("both", "spfeat", "loss")]
    assert [r["consistency_miou"] for r in rows] == [0.5, 0.6]
    assert [r["fid"] for r in rows] == [3.0, 2.0]  # the run-vs-real row, not the disjoint-halves one
    assert [r["downstream_miou"] for r in rows] == [None, None]  # no downstream table: absent, not invented
    assert rows[1]["kid"] == 0.002 and rows[1]["kid_std"] == 0.0005


def test_cohort_table_measures_each_third_on_its_own_images():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(9)]
    w = {i: float(k) for k, i in enumerate(ids)}  # s0..s2 low, s3..s5 medium, s6..s8 high
    rels = [f"img/{i}.png" for i in reversed(ids)]  # activation rows in another order than the ids
    acts = rng.normal(size=(9, 4))
    ref = rng.normal(size=(20, 4))
    seen = []

    def distance(a, b):
        seen.append(a.copy())
        return {"fid": float(a.sum()), "kid": 0.0, "kid_std": 0.0}

    run = {"name": "r", "samples": [], "predictions": None, "rels": rels, "acts": acts,
           "rel_of": {i: f"img/{i}.png" for i in ids}}
    table = cohort_table([run], w, ref, distance)
    assert [(r["cohort"], r["num_images"], r["miou"]) for r in table["rows"]] == [("low", 3, None), ("medium", 3, None),
                                                                                  ("high", 3, None)]
    for r, cohort in zip(table["rows"], ([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        rows = [rels.index(f"img/s{k}.png") for k in cohort]
        assert r["fid"] == pytest.approx(acts[rows].sum())
