"""The segment and seg-eval stages: the scores against a direct numpy computation, BatchNorm
recalibration, backbone weights, the crop-size rule against real forward passes, then one tiny
Ray Train run (2 workers, 32x64, 6 steps, a mixture of two datasets) through a killed worker,
whose model the seg-eval tests score (identity check: a byte-identical copy scores the same)."""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from synreal_ray import raytrain, storage
from synreal_ray.cli import main
from synreal_ray.config import from_dict
from synreal_ray.datasets.labels import LABEL_ID_OF_TRAIN, NUM_CLASSES, TRAIN_NAMES
from synreal_ray.datasets.layouts import list_dataset
from synreal_ray.segment import (
    SegmentConfig,
    _Streams,
    build_segmenter,
    check_crop,
    confusion_matrix,
    iou_from_confusion,
    load_backbone,
    load_segmenter,
    plan_steps,
    predict,
    prepare_sources,
    read_backbone,
    read_sample,
    recalibrate_bn,
    run_folder,
    run_segment,
    scores,
    segmenter_checkpoint,
    to_input,
)
from synreal_ray.train import list_checkpoints, read_metrics
from test_train import Killer, record_steps  # the same kill-a-worker machinery as the GAN training tests

# -- scores ------------------------------------------------------------------------------------


def direct_iou(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    """IoU of class c as cityscapesscripts counts it, pixel by pixel: pixels with ground truth 255
    count nowhere; NaN when the class is neither in the ground truth nor predicted on a labelled pixel."""
    valid = target != 255
    tp = np.sum((pred == c) & (target == c))
    fp = np.sum((pred == c) & (target != c) & valid)
    fn = np.sum((pred != c) & (target == c))
    return math.nan if tp + fp + fn == 0 else tp / (tp + fp + fn)


def test_confusion_matrix_and_miou_equal_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for shape in ((20, 30), (7, 11), (16, 16)):
        t = rng.integers(0, NUM_CLASSES, shape)
        t[t == 5] = 3  # class 5 (pole): in no ground truth and never predicted -> NaN
        t[t == 6] = 4  # class 6 (traffic light): in no ground truth but predicted -> IoU 0
        p = np.where(rng.random(shape) < 0.6, t, rng.integers(0, NUM_CLASSES, shape))
        p[p == 5] = 0
        p[p == 7] = 8  # class 7 (traffic sign): in the ground truth, never predicted -> IoU 0
        t[rng.random(shape) < 0.2] = 255  # ignored pixels, whatever is predicted there
        p[t == 255] = np.where(rng.random(int((t == 255).sum())) < 0.5, 5, 6)  # predictions on ignored pixels count nowhere
        preds.append(p.astype(np.uint8))
        targets.append(t.astype(np.uint8))
    cms = [confusion_matrix(p, t) for p, t in zip(preds, targets)]
    cm = sum(cms)
    assert cm.dtype == np.int64 and cm.shape == (NUM_CLASSES, NUM_CLASSES)
    allp = np.concatenate([p.ravel() for p in preds])
    allt = np.concatenate([t.ravel() for t in targets])
    np.testing.assert_array_equal(cm, confusion_matrix(allp, allt))  # matrices of parts add up exactly
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            assert cm[i, j] == np.sum((allt == i) & (allp == j))
    direct = np.array([direct_iou(allp, allt, c) for c in range(NUM_CLASSES)])
    iou = iou_from_confusion(cm)
    np.testing.assert_array_equal(np.isnan(iou), np.isnan(direct))
    np.testing.assert_allclose(iou[~np.isnan(iou)], direct[~np.isnan(direct)], rtol=1e-12)
    assert np.isnan(iou[5]) and iou[6] == 0 and iou[7] == 0
    s = scores(cm)
    valid = allt != 255
    assert s["miou"] == pytest.approx(np.mean([v for v in direct if not math.isnan(v)]), rel=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(np.mean(allp[valid] == allt[valid]), rel=1e-12)
    assert s["iou"]["pole"] is None and s["iou"]["traffic light"] == 0 and s["classes_evaluated"] == NUM_CLASSES - 1
    json.dumps(s, allow_nan=False)  # None, never NaN, in eval.json
    # the largest off-diagonal entry, in words
    off = cm.copy()
    np.fill_diagonal(off, 0)
    i, j = np.unravel_index(np.argmax(off), off.shape)
    assert s["top_confusions"][0] == (f"{TRAIN_NAMES[i]} → {TRAIN_NAMES[j]}: "
                                      f"{100 * cm[i, j] / cm[i].sum():.0f}% of {TRAIN_NAMES[i]} pixels")
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 19))


# -- BatchNorm, backbone, crop rule -----------------------------------------------------------------


def test_recalibrate_bn_sets_running_stats_to_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.01), torch.nn.Conv2d(3, 4, 1),
                                torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(4, momentum=0.01))
    batches = [torch.randn(4, 3, 6, 5) * 2 + torch.tensor([5.0, -3.0, 1.0]).view(1, 3, 1, 1) for _ in range(3)]
    with torch.no_grad():  # far from the data after some momentum-0.01 training steps
        for x in batches:
            model.train()(x)
    bn1, bn2 = model[0], model[3]
    assert (bn1.running_mean - torch.tensor([5.0, -3.0, 1.0])).abs().max() > 4
    assert recalibrate_bn(model, iter(batches)) == 3
    # the cumulative average of the batch statistics (batch means; unbiased batch variances)
    torch.testing.assert_close(bn1.running_mean, torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0))
    torch.testing.assert_close(bn1.running_var, torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0))
    # the second BatchNorm saw the conv of the first one's batch-normalised output, without dropout
    with torch.no_grad():
        z = [model[1](torch.nn.functional.batch_norm(x, None, None, bn1.weight, bn1.bias, training=True)) for x in batches]
    torch.testing.assert_close(bn2.running_mean, torch.stack([v.mean((0, 2, 3)) for v in z]).mean(0))
    torch.testing.assert_close(bn2.running_var, torch.stack([v.var((0, 2, 3)) for v in z]).mean(0))
    assert bn1.momentum == bn2.momentum == 0.01 and all(m.training for m in model.modules())
    before = bn1.running_mean.clone()
    assert recalibrate_bn(model, []) == 0 and torch.equal(bn1.running_mean, before)  # no batches: untouched

    # the real model: eval mode after recalibration predicts as training mode does on that batch (up
    # to the unbiased variance's n/(n-1), which 8x4x8 values at the deepest layer keep small)
    seg = build_segmenter("lraspp_mobilenet_v3_large")
    x = to_input(torch.randint(0, 256, (8, 64, 128, 3), dtype=torch.uint8))
    with torch.no_grad():
        train_out = seg.train()(x)["out"]
        before = (seg.eval()(x)["out"] - train_out).abs().mean()
        recalibrate_bn(seg, [x])
        after = (seg.eval()(x)["out"] - train_out).abs().mean()
    assert after < 0.1 * before, (after, before)


def test_backbone_weights_from_a_torchvision_classification_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(1)
    classifier = mobilenet_v3_large(weights=None, dilated=True)  # the layout of torchvision's ImageNet file
    path = str(tmp_path / "mobilenet_v3_large.pth")
    torch.save(classifier.state_dict(), path)
    seg = build_segmenter("lraspp_mobilenet_v3_large", backbone=read_backbone(path))
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, classifier.state_dict()["features." + k]), k
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="not backbone weights of this model"):
        load_backbone(build_segmenter("lraspp_mobilenet_v3_large"), read_backbone(path), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        read_backbone(str(tmp_path / "junk.pth"))


def test_the_crop_size_rule_is_what_forward_passes_in_training_mode_do():
    model = build_segmenter("lraspp_mobilenet_v3_large").train()
    for batch, h, w in ((1, 16, 16), (1, 17, 16), (1, 16, 32), (1, 8, 8), (2, 1, 1), (2, 16, 16)):
        try:
            with torch.no_grad():
                model(torch.randn(batch, 3, h, w))
            ran = True
        except ValueError:  # "Expected more than 1 value per channel when training"
            ran = False
        assert ran == (check_crop("lraspp_mobilenet_v3_large", (h, w), batch) is None), (batch, h, w)


def test_plan_is_a_function_of_the_step_and_follows_the_shares():
    ds, idx = plan_steps([5, 3], [3, 1], seed=0, start=0, stop=10)
    assert (ds == 0).sum(axis=1).tolist() == [3] * 10  # every batch: 3 of dataset 0, 1 of dataset 1
    # passes over a dataset are permutations of it: 30 draws of 5 samples are 6 of each, 10 of 3 are 3 or 4
    assert np.bincount(idx[ds == 0], minlength=5).tolist() == [6] * 5
    assert sorted(np.bincount(idx[ds == 1], minlength=3).tolist()) == [3, 3, 4]
    tail = plan_steps([5, 3], [3, 1], seed=0, start=6, stop=10)
    assert np.array_equal(tail[0], ds[6:]) and np.array_equal(tail[1], idx[6:])


def test_a_small_run_loads_in_its_workers_exactly_the_batches_its_ray_data_stream_gives(demo_data, ray_cluster,
                                                                                        tmp_path):
    cfg = from_dict(SegmentConfig, {
        "train": [{"uri": str(demo_data / "syn"), "layout": "synscapes", "share": 0.5},
                  {"uri": str(demo_data / "real"), "layout": "cityscapes", "share": 0.5}],
        "out": str(tmp_path / "out"), "image_size": "32x64", "batch_size": 4, "workers": 2, "steps": 5})
    streams = _Streams(cfg, prepare_sources(cfg))
    for rank in range(cfg.workers):
        here = list(raytrain.load_here(*streams.plan(rank), batch_size=2))
        streamed = list(streams.for_rank(rank).iter_torch_batches(batch_size=2))
        assert [b["step"].tolist() for b in here] == [[s, s] for s in range(5)]
        assert len(streamed) == len(here)
        for a, b in zip(here, streamed):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- the CLI's bad input: one line ------------------------------------------------------------------


def test_cli_bad_input_is_one_error_line(demo_data, tmp_path, capsys):
    syn = str(demo_data / "syn")
    base = ["segment", "--train", syn, "--train-layout", "synscapes", "--out", str(tmp_path / "o")]
    cases = [
        (base + ["--model", "segformer"], "error: model: 'segformer' is not one of 'lraspp_mobilenet_v3_large'"),
        (base + ["--image-size", "16x16", "--batch-size", "1"], "error: image_size: 16x16 is too small for "
                                                               "lraspp_mobilenet_v3_large with 1 image(s) per worker"),
        (base + ["--model", "deeplabv3_resnet50", "--batch-size", "1"], "error: batch_size: deeplabv3_resnet50 needs"),
        (["segment", "--train", syn, "--out", str(tmp_path / "o")], "error: --train needs --train-layout"),
        (["seg-eval", "--model", str(tmp_path / "none"), "--dataset", syn, "--layout", "synscapes",
          "--out", str(tmp_path / "e")], "error: "),
    ]
    nolabel = tmp_path / "nolabel"
    shutil.copytree(syn, nolabel)
    victim = sorted((nolabel / "img" / "class").iterdir())[3]
    victim.unlink()
    cases.append((["segment", "--train", str(nolabel), "--train-layout", "synscapes", "--out", str(tmp_path / "o")],
                  f"error: train[0] {nolabel}: 1 file(s) unusable, e.g. "))
    for args, start in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), (args, err)
    assert "image has no label map" in err[0] and victim.stem in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


# -- one Ray Train run through a killed worker, then seg-eval -----------------------------------------


@pytest.fixture(scope="module")
def seg_story(demo_data, ray_cluster, tmp_path_factory):
    """lraspp on a 50/50 mixture of the demo's synthetic and real sets: 6 steps, 2 workers of 2
    crops of 32x64, checkpoints (with BatchNorm recalibration) at 2, 4, 6, the raw synthetic set
    scored at the end (`val`). Rank 1 is SIGKILLed after step 3: Ray Train restarts the group from
    checkpoint 2."""
    root = tmp_path_factory.mktemp("seg_story")
    hooks = root / "hooks"
    hooks.mkdir()
    cfg = from_dict(SegmentConfig, {
        "train": [{"uri": str(demo_data / "syn"), "layout": "synscapes", "share": 0.5},
                  {"uri": str(demo_data / "real"), "layout": "cityscapes", "share": 0.5}],
        "val": str(demo_data / "syn"), "val_layout": "synscapes", "out": str(root / "out"), "image_size": "32x64", "batch_size": 4, "workers": 2,
        "steps": 6, "checkpoint_every": 2, "log_every": 2, "max_failures": 1, "bn_batches": 2, "lr": 0.02})
    killer = Killer(hooks)
    killer.start()
    t = time.time()
    try:
        record = run_segment(cfg, step_hook=functools.partial(record_steps, str(hooks), (3,)))
    finally:
        killer.stop.set()
    print(f"segment story: {time.time() - t:.1f} s")
    log = [line.split() for line in (hooks / "steps.log").read_text().splitlines()]
    return SimpleNamespace(cfg=cfg, record=record, killed=killer.killed,
                           log=[(int(s), int(r), int(p), h) for s, r, p, h in log])


def test_segment_survives_a_killed_worker_and_publishes(seg_story):
    cfg, record = seg_story.cfg, seg_story.record
    assert [m for m, _ in seg_story.killed] == ["kill_3"]
    pids = list(dict.fromkeys(p for _, r, p, _ in seg_story.log if r == 1))
    assert [min(s for s, r, p, _ in seg_story.log if p == pid) for pid in pids] == [1, 3]  # restarted at checkpoint 2
    digests: dict[int, set] = {}
    for s, r, _, h in seg_story.log:
        if r == 0:
            digests.setdefault(s, set()).add(h)
    # step 3 ran twice (before the kill, after the restart) and ended with identical weights:
    # same batches, same augmentation, same recalibrated BatchNorm statistics at checkpoint 2
    assert [s for s, r, _, _ in seg_story.log if r == 0].count(3) == 2
    assert sorted(digests) == [1, 2, 3, 4, 5, 6] and all(len(h) == 1 for h in digests.values()), digests
    assert [r["step"] for r in read_metrics(cfg.out)] == [2, 4, 6]  # logged at the checkpoints, each once
    assert all(np.isfinite(r["loss"]) and 0 <= r["pixel_accuracy"] <= 1 for r in read_metrics(cfg.out))
    assert [s for s, _ in list_checkpoints(run_folder(cfg.out))] == [2, 4, 6]
    meta = json.loads((Path(segmenter_checkpoint(cfg.out)) / "meta.json").read_text())
    assert meta["step"] == 6 and meta["bn_recalibrated"] == 2 and meta["image_size"] == [32, 64]
    assert storage.is_complete(cfg.out) and record["outputs"]["checkpoint"] == segmenter_checkpoint(cfg.out)
    assert Path(cfg.out, "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    val = json.loads(Path(cfg.out, "val", "eval.json").read_text())
    assert val["num_images"] == 24 and val["layout"] == "synscapes" and record["val"]["miou"] == val["miou"]
    assert run_segment(cfg)["skipped"] is True  # published with the same settings: nothing to do


def test_seg_eval_of_a_byte_identical_copy_is_identical_and_exact(seg_story, demo_data, tmp_path, capsys):
    """The identity check: a translation that changes nothing scores what the raw synthetic set
    scores (there: the segment run's own `val` scoring, same batch size, done in-process since
    the set is small; here forced through the actor pool with --in-process-max 0, so the two paths
    are compared too). Also: the actors' summed matrix equals a plain in-process loop's, and the
    saved predictions are the model's, as Cityscapes label IDs."""
    copy = tmp_path / "identity"
    shutil.copytree(demo_data / "syn", copy)
    raw = json.loads(Path(seg_story.cfg.out, "val", "eval.json").read_text())
    assert raw["in_process"] is True and raw["actors"] == 0
    args = ["seg-eval", "--model", seg_story.cfg.out, "--dataset", str(copy), "--layout", "synscapes",
            "--out", str(tmp_path / "copy"), "--save-predictions", "--in-process-max", "0"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("seg-eval: mIoU ") and str(tmp_path / "copy") in last
    assert main(args) == 0 and capsys.readouterr().out.strip().endswith("(up to date, skipped)")
    same = json.loads((tmp_path / "copy" / "eval.json").read_text())
    assert same["in_process"] is False and same["actors"] >= 1
    assert raw["num_images"] == same["num_images"] == 24
    for key in ("confusion", "miou", "pixel_accuracy", "iou", "top_confusions", "step"):
        assert raw[key] == same[key], key
    assert storage.is_complete(str(tmp_path / "copy")) and (tmp_path / "copy" / "confusion.png").exists()
    assert "| road |" in (tmp_path / "copy" / "eval.md").read_text()

    # A plain loop under the actors' conditions (one torch thread, the same batches of 4: a pixel
    # whose two best logits nearly tie may flip with another batch size or thread count).
    model, meta = load_segmenter(seg_story.cfg.out)
    assert meta["step"] == 6
    samples, _ = list_dataset(str(copy), "synscapes")
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(0, len(samples), 4):
            pairs = [read_sample(s.image_uri, s.label_uri) for s in samples[k:k + 4]]
            for s, pred, (_, label) in zip(samples[k:k + 4], predict(model, [im for im, _ in pairs]), pairs):
                cm += confusion_matrix(pred, label)
                saved = Image.open(io.BytesIO((tmp_path / "copy" / "predictions" / f"{s.id}.png").read_bytes()))
                np.testing.assert_array_equal(np.asarray(saved), LABEL_ID_OF_TRAIN[pred])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(cm, np.asarray(raw["confusion"]))  # the actors' matrices, summed exactly
