"""Stage `translate`: checkpoints, the pure core, layouts, S3, resuming after a kill, and the
small-set path (in this process) against the actor pool."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synreal_ray import storage
from synreal_ray.datasets.layouts import list_dataset
from synreal_ray.models import build_model
from synreal_ray.translate import (
    MANIFEST,
    TranslateConfig,
    encode_image,
    load_generator,
    resolve_checkpoint,
    run_translate,
    training_scale,
    translate_batch,
    translate_images,
)

from conftest import RUN_DIR

TINY = dict(base_channels=8, n_res=2, dis_channels=8, pool_size=4, pool_seed=0)
# slow enough on CPU (~0.1 s per 64x128 image) that a kill lands mid-run
SLOWER = dict(base_channels=32, n_res=4, dis_channels=8, pool_size=4, pool_seed=0)


def save_checkpoint(folder: str, step: int, seed: int, config=TINY, name="cyclegan", image_size=(64, 128)):
    """A checkpoint in the training stage's contract: state.pt + meta.json."""
    torch.manual_seed(seed)
    model = build_model(name, **config)
    buf = io.BytesIO()
    torch.save({"model_name": name, "model_config": config, "model": model.state_dict(), "optimizers": {},
                "schedulers": {}, "sampler": {}, "step": step}, buf)
    storage.write_bytes(storage.join(folder, "state.pt"), buf.getvalue())
    storage.write_json(storage.join(folder, "meta.json"),  # last, with state.pt's size: a complete checkpoint
                       {"step": step, "model_name": name, "model_config": config, "image_size": list(image_size),
                        "state_bytes": len(buf.getvalue())})
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's output with two checkpoints (Ray Train's nesting); step 7 is the latest."""
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(str(root / "ray" / "exp" / "checkpoint_000000"), 7, seed=1)
    save_checkpoint(str(root / "ray" / "exp" / "checkpoint_000001"), 3, seed=2)  # newer folder, older step
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output(out: str, dataset: str, layout: str, split=None) -> None:
    """Every image present once, decodable, of its source's size and with the manifest's checksum;
    every label byte-identical; the layout is the input's."""
    src, _ = list_dataset(dataset, layout, split)
    got, problems = list_dataset(out, layout, split)
    assert not problems and [s.id for s in got] == [s.id for s in src]
    table = pq.read_table(storage.join(out, MANIFEST)) if not storage.is_s3(out) else _read_s3_parquet(out)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(src)
    for s, o in zip(src, got):
        r = rows[s.id]
        assert r["output_uri"] == o.image_uri and r["label_uri"] == o.label_uri
        data = storage.read_bytes(o.image_uri)
        assert sha(data) == r["checksum"] and len(data) == r["size"]
        img = Image.open(io.BytesIO(data))
        img.load()  # a truncated file fails here
        assert img.size == Image.open(io.BytesIO(storage.read_bytes(s.image_uri))).size == (r["width"], r["height"])
        assert storage.read_bytes(o.label_uri) == storage.read_bytes(s.label_uri)
    leftovers = [u for u in storage.list_files(out) if ".tmp-" in u or "/_manifest/" in u]
    assert not leftovers
    assert storage.is_complete(out)


def _read_s3_parquet(out: str):
    fs, path = storage.resolve(storage.join(out, MANIFEST))
    return pq.read_table(path, filesystem=fs)


# --- pure -------------------------------------------------------------------------------------

def test_resolve_checkpoint_picks_highest_step(run_dir, tmp_path):
    best = str(run_dir / "ray" / "exp" / "checkpoint_000000")
    assert resolve_checkpoint(str(run_dir)) == best
    assert resolve_checkpoint(best) == best
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path))
    # a checkpoint whose state.pt is not the size its meta.json records is still being written
    save_checkpoint(str(tmp_path / "ok"), 2, seed=0)
    partial = str(tmp_path / "partial")
    save_checkpoint(partial, 9, seed=0)
    storage.write_json(f"{partial}/meta.json", {"step": 9, "state_bytes": 1})
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_checkpoint(partial)
    # the generator is the step-7 model's
    torch.manual_seed(1)
    ref = build_model("cyclegan", **TINY).generator_s2r()
    gen, multiple = load_generator(str(run_dir))
    assert multiple == 4
    for a, b in zip(gen.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_translate_batch_any_size():
    torch.manual_seed(0)
    model = build_model("cyclegan", **TINY)
    gen = model.generator_s2r().eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 128, 3), dtype=np.uint8), rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)]
    out = translate_batch(gen, images, multiple=4)
    assert [o.shape for o in out] == [im.shape for im in images] and all(o.dtype == np.uint8 for o in out)
    # a divisible size needs no padding: exactly the model's own translation
    x = torch.from_numpy(images[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = ((model.translate(x)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    assert np.array_equal(out[0], ref)
    assert encode_image(out[1], "a.png")[:4] == b"\x89PNG" and encode_image(out[1], "a.jpg")[:2] == b"\xff\xd8"


def test_translate_images_at_the_training_scale():
    assert training_scale((1440, 2560), (256, 512)) == pytest.approx(0.2)  # covers the crop: the larger ratio
    torch.manual_seed(0)
    gen = build_model("cyclegan", **TINY).generator_s2r().eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 128, 3), dtype=np.uint8), rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)]
    out = translate_images(gen, images, multiple=4, train_size=(32, 64))
    assert [o.shape for o in out] == [im.shape for im in images]
    # the first by hand: down to the training scale, translated there, back up to its own size
    small = np.asarray(Image.fromarray(images[0]).resize((64, 32), Image.Resampling.BICUBIC))
    back = Image.fromarray(translate_batch(gen, [small], multiple=4)[0]).resize((128, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(out[0], np.asarray(back))
    assert not np.array_equal(out[0], translate_batch(gen, images[:1], multiple=4)[0])  # not the full-size result
    # at the training scale already (or without a training size): the plain full-resolution translation
    assert np.array_equal(translate_images(gen, images[:1], train_size=(64, 128))[0], translate_batch(gen, images[:1])[0])
    assert np.array_equal(translate_images(gen, images[:1])[0], translate_batch(gen, images[:1])[0])
    with pytest.raises(ValueError, match="scale"):
        TranslateConfig(checkpoint="c", dataset="d", layout="synscapes", out="o", scale="half")


# --- on Ray -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_scale_train_keeps_sizes_and_labels(ray_cluster, demo_data, tmp_path):
    """A generator trained at 32x64 translates the 64x128 demo images at 32x64 and returns them at
    64x128; labels are byte-identical (check_output)."""
    ckpt = str(tmp_path / "ckpt")
    model = save_checkpoint(ckpt, 1, seed=5, image_size=(32, 64))
    out = str(tmp_path / "out")
    run_translate(TranslateConfig(checkpoint=ckpt, dataset=str(demo_data / "syn"), layout="synscapes", out=out,
                                  batch_size=8, actors=1))
    check_output(out, str(demo_data / "syn"), "synscapes")
    src, _ = list_dataset(str(demo_data / "syn"), "synscapes")
    got, _ = list_dataset(out, "synscapes")
    image = np.asarray(Image.open(src[0].image_uri).convert("RGB"))
    want = translate_images(model.generator_s2r().eval(), [image], multiple=4, train_size=(32, 64))[0]
    assert np.array_equal(np.asarray(Image.open(got[0].image_uri).convert("RGB")), want)


@pytest.mark.slow
def test_translate_local_layouts_and_idempotent(ray_cluster, demo_data, run_dir, tmp_path):
    for dataset, layout, split in ((demo_data / "syn", "synscapes", None), (demo_data / "real", "cityscapes", "train")):
        out = str(tmp_path / layout)
        rec = run_translate(TranslateConfig(checkpoint=str(run_dir), dataset=str(dataset), layout=layout, split=split,
                                            out=out, batch_size=4, actors=1))
        assert rec["translated"] == rec["images"] and rec["step"] == 7
        check_output(out, str(dataset), layout, split)
    # re-running changes nothing
    before = {u: os.stat(u).st_mtime_ns for u in storage.list_files(out)}
    rec = run_translate(TranslateConfig(checkpoint=str(run_dir), dataset=str(dataset), layout=layout, split=split,
                                        out=out, actors=1))
    assert rec["skipped"]
    assert {u: os.stat(u).st_mtime_ns for u in storage.list_files(out)} == before


@pytest.mark.slow
def test_in_process_writes_what_the_pool_writes(ray_cluster, demo_data, run_dir, tmp_path):
    """24 images, under in_process_max: translated in this process; with in_process_max 0 by an
    actor pool. The same bytes either way: images, labels, manifest (paths relative to each out)."""
    outs = {}
    for where, most in (("here", TranslateConfig.in_process_max), ("pool", 0)):
        outs[where] = str(tmp_path / where)
        rec = run_translate(TranslateConfig(checkpoint=str(run_dir), dataset=str(demo_data / "syn"), layout="synscapes",
                                            out=outs[where], batch_size=5, actors=1, in_process_max=most))
        assert (rec["actors"], rec["device"], rec["translated"]) == ((0 if where == "here" else 1), "cpu", 24)
        check_output(outs[where], str(demo_data / "syn"), "synscapes")

    def files(out):
        return {os.path.relpath(u, out): storage.read_bytes(u) for u in storage.list_files(out)
                if not u.endswith(("stage.json", "_SUCCESS", MANIFEST))}

    def manifest(out):
        rows = pq.read_table(storage.join(out, MANIFEST)).to_pylist()
        return [{k: v.replace(out, "<out>") if k in ("output_uri", "label_uri") else v for k, v in r.items()}
                for r in rows]

    here = files(outs["here"])
    assert len(here) == 48 and here == files(outs["pool"])  # 24 images and 24 label maps, byte for byte
    assert manifest(outs["here"]) == manifest(outs["pool"])


@pytest.mark.slow
def test_bad_image_fails_cleanly_then_resumes(ray_cluster, demo_data, run_dir, tmp_path):
    """A corrupt image stops the run unpublished with its name; the other images stay journaled,
    a half-written temporary left by a crash is cleaned, and the re-run translates only the rest."""
    import shutil

    dataset = tmp_path / "syn"
    shutil.copytree(demo_data / "syn", dataset)
    bad = dataset / "img" / "rgb" / "5.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    out = tmp_path / "out"
    cfg = TranslateConfig(checkpoint=str(run_dir), dataset=str(dataset), layout="synscapes", out=str(out),
                          batch_size=4, actors=1)
    with pytest.raises(ValueError, match="5.png: unreadable or truncated image"):
        run_translate(cfg)
    assert not storage.is_complete(str(out))
    (out / "img" / "rgb" / "7.png.tmp-deadbeef").write_bytes(b"half")  # as a kill mid-write leaves
    bad.write_bytes(good)
    rec = run_translate(cfg)
    assert rec["translated"] == 1 and rec["resumed_from"] == rec["images"] - 1 and rec["removed_temporaries"] == 1
    check_output(str(out), str(dataset), "synscapes")


@pytest.mark.slow
@pytest.mark.parametrize("in_process_max", [0, TranslateConfig.in_process_max], ids=["pool", "in-process"])
def test_s3_killed_midway_then_resumed(ray_cluster, demo_data, s3_bucket, s3_server, tmp_path, in_process_max):
    """The real CLI on the session's cluster writes to SeaweedFS and is SIGKILLed once some images
    are journaled (by its actor pool, or by itself for these 24 images); the re-run completes with
    every image present once and intact."""
    ckpt = f"{s3_bucket}/run/checkpoint_000004"
    save_checkpoint(ckpt, 4, seed=3, config=SLOWER)
    out = f"{s3_bucket}/translated"
    bucket, prefix = s3_bucket[len("s3://"):], "translated/_manifest/"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    args = [sys.executable, "-m", "synreal_ray.cli", "translate", "--checkpoint", f"{s3_bucket}/run",
            "--dataset", str(demo_data / "syn"), "--layout", "synscapes", "--out", out, "--batch-size", "1",
            "--actors", "1", "--in-process-max", str(in_process_max)]
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(args, env=env, cwd=RUN_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while not s3_server.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount"):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no image was journaled in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not storage.is_complete(out), "the run finished before the kill: nothing was tested"
    journaled = s3_server.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"]

    time.sleep(1.0)  # let Ray reap the killed driver's actor (it would only rewrite identical bytes)
    rec = run_translate(TranslateConfig(checkpoint=f"{s3_bucket}/run", dataset=str(demo_data / "syn"),
                                        layout="synscapes", out=out, batch_size=4, actors=1,
                                        in_process_max=in_process_max))
    print(f"killed with {journaled} batch(es) journaled; the re-run kept {rec['resumed_from']} and translated "
          f"{rec['translated']}")
    assert rec["resumed_from"] >= journaled >= 1 and rec["translated"] == rec["images"] - rec["resumed_from"] > 0
    check_output(out, str(demo_data / "syn"), "synscapes")
    assert run_translate(TranslateConfig(checkpoint=f"{s3_bucket}/run", dataset=str(demo_data / "syn"),
                                         layout="synscapes", out=out))["skipped"]
