"""Stage `translate`: a synthetic dataset -> the same dataset made real-looking by a trained generator.

Ray Data lists the dataset's images; an actor pool (one actor per GPU, else CPU actors) loads the
synthetic -> real generator once per actor and translates batches (fp16 autocast on GPU). With
`scale: train` (the default) each image is first resized by the factor training resized it by
(the generator has only seen that scale), translated, and resized back to its own size; with
`scale: full` it is translated at its full resolution. Labels are copied untouched either way.
At most `in_process_max` images to translate (cluster.IN_PROCESS_MAX) are done by the same actor
class in the calling process instead, with no pool to start: the same files, journal and manifest.
The output is a ready training set in the input's layout:

  <out>/<same relative image paths>   translated images (same names and format)
  <out>/<same relative label paths>   label maps, copied byte for byte
  <out>/manifest.parquet              id, source_uri, output_uri, label_source_uri, label_uri, height,
                                      width, size (bytes of the written image), checksum (its sha256),
                                      label_checksum
  <out>/stage.json, <out>/_SUCCESS    written last

Resumable and idempotent: each actor batch writes its images and labels (each object whole), then
a journal part `_manifest/part-*.parquet` naming them. A re-run after a crash keeps what the
journal records and translates the rest; a completed output with the same fingerprint (checkpoint,
dataset listing, layout) is skipped. The journal is merged into `manifest.parquet` at the end.
The stage marker records which run (fingerprint) the journal belongs to: a run with another
checkpoint or dataset clears the output instead of mixing two translations.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass

import numpy as np

from synreal_ray import storage
from synreal_ray.checkpoints import META, STATE, is_complete
from synreal_ray.cluster import IN_PROCESS_MAX, call_in_batches, items_dataset, local_device
from synreal_ray.config import URI, ConfigError, check_pool_keys
from synreal_ray.datasets.images import by_shape
from synreal_ray.datasets.layouts import LAYOUTS, list_dataset
from synreal_ray.progress import bar as progress_bar

log = logging.getLogger(__name__)

JOURNAL = "_manifest"
MANIFEST = "manifest.parquet"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


# --- checkpoints (synreal_ray/checkpoints.py says what a complete one is) ---------------------

def resolve_checkpoint(uri: str) -> str:
    """A checkpoint folder (holding state.pt) -> itself; a training run's output -> its complete
    checkpoint with the highest step (meta.json's "step") found anywhere below it."""
    uri = str(uri).rstrip("/")
    uri = uri if storage.is_s3(uri) else os.path.abspath(uri)
    if storage.exists(storage.join(uri, STATE)):
        if not is_complete(uri):
            raise FileNotFoundError(f"{uri}: incomplete checkpoint ({STATE} missing or not the size {META} records)")
        return uri
    best, best_step = None, -1
    for meta_uri in storage.list_files(uri, META):
        if posixpath.basename(meta_uri.replace(os.sep, "/")) != META:
            continue
        folder = meta_uri[: -len(META) - 1]
        try:
            step = int(storage.read_json(meta_uri)["step"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            raise ValueError(f"{meta_uri}: checkpoint meta.json without an integer 'step'") from None
        if step > best_step and is_complete(folder):  # skips one being written, or another meta.json
            best, best_step = folder, step
    if best is None:
        raise FileNotFoundError(f"{uri}: no complete checkpoint here (a folder with {STATE} and {META}) or below it")
    return best


def read_generator(checkpoint_uri: str) -> dict:
    """The synthetic -> real generator of a checkpoint as a small picklable payload
    {model_name, model_config, step, state} (the generator's state dict only, no discriminators
    or optimisers), so actors anywhere on the cluster get it through the object store."""
    import torch

    from synreal_ray.models import build_model, check_checkpoint_version

    uri = storage.join(checkpoint_uri, STATE)
    try:  # weights_only: the training stage saves tensors, numbers and strings only; no pickled code
        ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{uri}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for key in ("model_name", "model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{uri}: checkpoint lacks key {key!r} (has {sorted(ckpt)})")
    check_checkpoint_version(ckpt["model_name"], ckpt.get("checkpoint_version"), uri)
    model = build_model(ckpt["model_name"], **ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{uri}: model state does not fit {ckpt['model_name']} {ckpt['model_config']} "
                         f"({str(e).splitlines()[0]})") from None
    gen = {k: v.clone() for k, v in model.generator_s2r().state_dict().items()}
    meta = storage.join(checkpoint_uri, META)
    size = storage.read_json(meta).get("image_size") if storage.exists(meta) else None
    return {"model_name": ckpt["model_name"], "model_config": dict(ckpt["model_config"]),
            "step": ckpt.get("step"), "state": gen, "image_size": list(size) if size else None}


def generator_from_payload(payload: dict, device="cpu"):
    """(generator module in eval mode on `device`, size multiple its input needs)."""
    from synreal_ray.models import build_model, default_config

    name, cfg = payload["model_name"], payload["model_config"]
    model = build_model(name, **cfg)
    gen = model.generator_s2r()
    gen.load_state_dict(payload["state"])
    n_down = cfg.get("n_downsample", default_config(name)["n_downsample"])
    return gen.to(device).eval(), 2 ** int(n_down)


def load_generator(checkpoint_uri: str, device="cpu"):
    """Generator of a checkpoint (or of the latest checkpoint of a run): (module, size multiple)."""
    return generator_from_payload(read_generator(resolve_checkpoint(checkpoint_uri)), device)


# --- the pure core ----------------------------------------------------------------------------

def translate_batch(gen, images: list[np.ndarray], multiple: int = 4, amp: bool = True) -> list[np.ndarray]:
    """uint8 RGB (H, W, 3) images of any sizes -> translated uint8 images of the same sizes.

    Equal sizes run as one batch. The generator needs H, W divisible by `multiple`: images are
    reflect-padded up to it and cropped back, so any full resolution works. amp: fp16 autocast on
    CUDA (ignored on CPU)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    device = next(gen.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else contextlib.nullcontext()
    out: list = [None] * len(images)
    for (h, w, _), idx in by_shape(images).items():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device)
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        with torch.no_grad(), autocast:
            y = gen(x)
        y = y[:, :, :h, :w].float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        y = y.permute(0, 2, 3, 1).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


def training_scale(shape: tuple[int, int], train_size: tuple[int, int]) -> float:
    """The factor training scaled an image of `shape` (H, W) by: it covers the training crop
    (train.read_training_image), so the larger of the two ratios."""
    return max(train_size[0] / shape[0], train_size[1] / shape[1])


def translate_images(gen, images: list[np.ndarray], multiple: int = 4, amp: bool = True,
                     train_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """translate_batch at the training scale: each image is resized by `training_scale`, translated
    and resized back to its own size (bicubic both ways). train_size None: at full resolution."""
    from PIL import Image

    if train_size is None:
        return translate_batch(gen, images, multiple, amp)
    scaled = []
    for im in images:
        h, w = im.shape[:2]
        s = training_scale((h, w), train_size)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        scaled.append(im if size == (w, h) else np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)))
    out = translate_batch(gen, scaled, multiple, amp)
    return [y if y.shape == im.shape else
            np.asarray(Image.fromarray(y).resize((im.shape[1], im.shape[0]), Image.Resampling.BICUBIC))
            for y, im in zip(out, images)]


def decode_rgb(data: bytes, uri: str) -> np.ndarray:
    """uint8 RGB of an image file; unreadable or over the pixel limit: ImageError (a ValueError)."""
    from synreal_ray.datasets.images import decode_image

    return np.asarray(decode_image(data, uri).convert("RGB"))


def encode_image(arr: np.ndarray, name: str) -> bytes:
    """uint8 RGB -> bytes in the format of `name`'s extension (PNG lossless; JPEG at quality 95)."""
    from PIL import Image

    fmt = FORMATS.get(posixpath.splitext(name)[1].lower(), "PNG")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the Ray shell ---------------------------------------------------------------------------

MANIFEST_FIELDS = (("id", "string"), ("source_uri", "string"), ("output_uri", "string"),
                   ("label_source_uri", "string"), ("label_uri", "string"), ("height", "int32"),
                   ("width", "int32"), ("size", "int64"), ("checksum", "string"), ("label_checksum", "string"))


def manifest_schema():
    import pyarrow as pa

    return pa.schema([(k, getattr(pa, t)()) for k, t in MANIFEST_FIELDS])


class Translator:
    """Ray Data actor (or, for a small set, called in the driver): the generator is loaded once;
    each batch's images and labels are written whole, then the batch's journal part (named after
    its ids: a retried batch rewrites it)."""

    def __init__(self, generator, journal: str, amp: bool = True, device: str = "cpu", scale: str = "train"):
        import ray

        if isinstance(generator, ray.ObjectRef):
            generator = ray.get(generator)
        self.gen, self.multiple = generator_from_payload(generator, device)
        self.journal, self.amp = journal, amp
        self.train_size = tuple(generator["image_size"]) if scale == "train" else None

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa

        # A bad image is reported in the summary, not raised: the rest of the batch (and of the
        # dataset) is still translated and journaled, so fixing the file and re-running is cheap.
        ok, images, errors = [], [], []
        for i, u in enumerate(str(u) for u in batch["image_uri"]):
            try:
                images.append(decode_rgb(storage.read_bytes(u), u))
                ok.append(i)
            except (ValueError, FileNotFoundError) as e:
                errors.append(str(e))
        translated = translate_images(self.gen, images, self.multiple, self.amp, self.train_size)
        rows = {k: [] for k, _ in MANIFEST_FIELDS}
        for i, y in zip(ok, translated):
            src = str(batch["image_uri"][i])
            out, lab_src, lab_out = str(batch["output_uri"][i]), str(batch["label_uri"][i]), str(batch["label_out"][i])
            data = encode_image(y, out)
            storage.write_bytes(out, data)
            label = storage.read_bytes(lab_src)
            storage.write_bytes(lab_out, label)
            for k, v in zip(rows, (str(batch["id"][i]), src, out, lab_src, lab_out, y.shape[0], y.shape[1],
                                   len(data), sha256(data), sha256(label))):
                rows[k].append(v)
        if rows["id"]:  # after its images: a journal row always names objects that exist whole
            storage.write_parquet(pa.table(rows, schema=manifest_schema()),
                                  storage.join(self.journal, storage.part_name(rows["id"])))
        return {"n": np.array([len(rows["id"])]), "errors": np.array([json.dumps(errors)])}


@dataclass(frozen=True)
class TranslateConfig:
    checkpoint: URI
    dataset: URI
    layout: str
    out: URI
    split: str | None = None
    batch_size: int = 8
    actors: int | None = None
    amp: bool = True
    device: str = "auto"  # of the generator actors: auto (GPU when the cluster has one), cpu or cuda
    scale: str = "train"  # train: at the scale the generator was trained at, then back to full size; full: as is
    in_process_max: int = IN_PROCESS_MAX  # at most this many images to translate: in this process, no actor pool

    def __post_init__(self):
        if self.scale not in ("train", "full"):
            raise ConfigError(f"{self.scale!r} is not one of train, full", "scale")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.layout!r} is not one of {', '.join(LAYOUTS)}", "layout")
        check_pool_keys(self)


def _read_journal(out: str):

    if not storage.data_files(storage.join(out, JOURNAL)):
        return manifest_schema().empty_table()
    return storage.read_table(storage.join(out, JOURNAL), schema=manifest_schema())


def _remove_temporaries(out: str) -> int:
    """Local writes go through `<name>.tmp-<hex>` + rename: a kill in between leaves the
    temporary behind (S3 has no such remains: an unfinished PUT never appears)."""
    if storage.is_s3(out):
        return 0
    stale = [u for u in storage.list_files(out) if ".tmp-" in os.path.basename(u)]
    for u in stale:
        os.remove(u)
    return len(stale)


def _manifest_from_journal(out: str, samples) -> pa.Table:  # noqa: F821
    """One row per sample, in id order, from the journal; duplicates (a batch retried, or
    re-done by a resumed run while a killed one was still writing) are reconciled against the
    object actually stored."""
    import pyarrow as pa

    rows = _read_journal(out).to_pylist()
    by_id: dict[str, dict] = {}
    for r in rows:
        prev = by_id.get(r["id"])
        if prev is not None and (prev["checksum"], prev["label_checksum"]) != (r["checksum"], r["label_checksum"]):
            data = storage.read_bytes(r["output_uri"])
            r = {**r, "size": len(data), "checksum": sha256(data)}
        by_id[r["id"]] = r
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} image(s) were not translated (e.g. {missing[0]})")
    ordered = [by_id[s.id] for s in samples]
    stored = set(storage.list_files(out))
    absent = [r["output_uri"] for r in ordered if r["output_uri"] not in stored] + \
             [r["label_uri"] for r in ordered if r["label_uri"] not in stored]
    if absent:
        raise RuntimeError(f"{absent[0]}: listed in the journal but not stored ({len(absent)} missing)")
    return pa.Table.from_pylist(ordered, schema=manifest_schema())


def _translate_in_process(generator: dict, todo: list[dict], cfg: TranslateConfig, journal: str):
    """Translator's work in this process, batch by batch (no actor pool to start): on CPU with one
    torch thread, as each pool actor has, so the images come out the same either way. Returns
    (its output batches, the torch device)."""
    device = local_device(cfg.device, "--device")
    translator = Translator(generator, journal, cfg.amp, device, cfg.scale)
    return call_in_batches(translator, todo, cfg.batch_size, threads=1 if device == "cpu" else None), device


def _translate_with_pool(generator: dict, todo: list[dict], cfg: TranslateConfig, journal: str):
    """Translator on a Ray Data actor pool over `todo`: (its output batches, the pool size, the
    actors' torch device)."""
    import ray

    from synreal_ray.cluster import actor_resources, init_ray

    init_ray()
    actors, resources, device = actor_resources(cfg.actors, cfg.device, key="--device")
    ds, actors = items_dataset(todo, cfg.batch_size, actors)
    kwargs = {"generator": ray.put(generator), "amp": cfg.amp, "device": device, "journal": journal,
              "scale": cfg.scale}
    results = ds.map_batches(Translator, fn_constructor_kwargs=kwargs,
                             compute=ray.data.ActorPoolStrategy(size=actors), batch_size=cfg.batch_size,
                             batch_format="numpy", **resources)
    results.context.enable_progress_bars = False  # run_translate's bar counts images
    return results.iter_batches(batch_size=None, batch_format="numpy"), actors, device


def run_translate(cfg: TranslateConfig, force: bool = False) -> dict:
    """Run (or resume, or skip) the stage; returns its stage.json record (+ "skipped")."""
    from synreal_ray.stage import STAGE_JSON, Stage

    samples, problems = list_dataset(cfg.dataset, cfg.layout, cfg.split)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0].uri}: {problems[0].reason}{more}")
    ckpt = resolve_checkpoint(cfg.checkpoint)
    fs, path = storage.resolve(storage.join(ckpt, STATE))
    st = fs.get_file_info(path)  # size and time stand in for the weights: a re-saved checkpoint re-translates
    settings = {"checkpoint": ckpt, "checkpoint_state": [st.size, st.mtime_ns], "dataset": cfg.dataset,
                "layout": cfg.layout, "split": cfg.split, "amp": cfg.amp, "scale": cfg.scale,
                "listing": hashlib.sha1("\n".join(f"{s.id}|{s.image_uri}|{s.label_uri}" for s in samples).encode()).hexdigest()}
    out = cfg.out if storage.is_s3(cfg.out) else os.path.abspath(cfg.out)
    # The journal belongs to one run (checkpoint, dataset listing, settings): another run clears it.
    stage = Stage("translate", out, settings, inputs=[cfg.dataset, ckpt], run_settings=settings,
                  run_inputs=[ckpt])
    if not stage.begin(force):
        return {"skipped": True, **storage.read_json(storage.join(out, STAGE_JSON))}
    removed, done = 0, set()
    if stage.resumed:
        removed = _remove_temporaries(out)
        done = set(_read_journal(out).column("id").to_pylist())

    root = str(cfg.dataset).rstrip("/")
    todo = [{"id": s.id, "image_uri": s.image_uri, "label_uri": s.label_uri,
             "output_uri": storage.safe_join(out, storage.relpath(s.image_uri, root)),
             "label_out": storage.safe_join(out, storage.relpath(s.label_uri, root))}
            for s in samples if s.id not in done]
    t0 = time.time()
    actors, device, first, after_first = 0, None, None, 0
    if todo:
        generator = read_generator(ckpt)
        if cfg.scale == "train" and not generator["image_size"]:
            raise ValueError(f"{ckpt}: its meta.json records no training image_size; translate with scale full")
        journal = storage.join(out, JOURNAL)
        if len(todo) <= cfg.in_process_max:  # a pool's start-up would outweigh the work
            batches, device = _translate_in_process(generator, todo, cfg, journal)
        else:
            batches, actors, device = _translate_with_pool(generator, todo, cfg, journal)
        bar = progress_bar(len(samples), "translate", "img", log, initial=len(done))
        errors = []
        for batch in batches:
            for e in batch["errors"]:
                errors.extend(json.loads(e))
            n = int(batch["n"].sum())
            if first is None:  # the generator is up: the rate from here on leaves start-up out (roughly)
                first = time.time()
            else:
                after_first += n
            bar.update(n)
        bar.close()
        if errors:  # unpublished; what was translated stays journaled for the re-run
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ValueError(f"{errors[0]}{more}; fix and re-run: the {len(samples) - len(errors)} translated "
                             f"images are kept")
    seconds = time.time() - t0
    steady = round(after_first / (time.time() - first), 2) if after_first else None

    storage.write_parquet(_manifest_from_journal(out, samples), storage.join(out, MANIFEST))
    record = stage.publish(images=len(samples), translated=len(todo), resumed_from=len(done),
                           removed_temporaries=removed, actors=actors, device=device, checkpoint=ckpt,
                           step=_checkpoint_step(ckpt),
                           translate_seconds=round(seconds, 3),
                           images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else None,
                           steady_images_per_s=steady,
                           config={k: v for k, v in asdict(cfg).items() if k != "out"})
    # housekeeping after _SUCCESS: the manifest holds everything the journal did
    storage.delete_dir(storage.join(out, JOURNAL))
    return record


def _checkpoint_step(ckpt: str) -> int | None:
    meta = storage.join(ckpt, META)
    return storage.read_json(meta).get("step") if storage.exists(meta) else None
