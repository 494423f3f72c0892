"""The features stage on a real Ray cluster, local folders and SeaweedFS S3, and its bad inputs."""

import io
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synreal_ray import storage
from synreal_ray.cli import main
from synreal_ray.datasets.demo import make_demo_data
from synreal_ray.datasets.labels import to_train_ids
from synreal_ray.features import FeaturesConfig, features_meta, load_features, run_features
from synreal_ray.spfeat import sp_feat

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


def expected_features(root, layout, split=None, levels=(1, 2, 4)):
    from synreal_ray.datasets.layouts import list_dataset

    samples, _ = list_dataset(str(root), layout, split)
    return {s.id: sp_feat(to_train_ids(np.asarray(Image.open(io.BytesIO(storage.read_bytes(s.label_uri))))), levels=levels)
            for s in samples}


def assert_features_equal(out, expected):
    got = load_features(str(out))
    assert list(got["id"]) == sorted(expected)
    for i, feat in zip(got["id"], got["feature"]):
        np.testing.assert_array_equal(feat, expected[i])


def test_pipeline_equals_sp_feat_on_each_file(demo_data, tmp_path):
    out = tmp_path / "syn"
    # batch_size 4 -> several tasks and Parquet parts, spread over the cluster's workers
    rec = run_features(FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=str(out), batch_size=4))
    assert rec["rows"] == 24 and rec["domain"] == "syn"
    assert len(list((out / "features").glob("*.parquet"))) > 2
    assert_features_equal(out, expected_features(demo_data / "syn", "synscapes"))
    table = pq.read_table(out / "features")
    assert set(table.column_names) == {"id", "domain", "image_uri", "label_uri", "height", "width", "feature"}
    assert set(table.column("height").to_pylist()) == {64} and set(table.column("width").to_pylist()) == {128}
    assert features_meta(str(out)) == {"levels": "1x1,2x2,4x4", "num_classes": 19, "dim": 399, "domain": "syn"}
    assert (out / storage.SUCCESS).exists()


def test_cli_real_split_levels_and_rerun_is_skipped(demo_data, tmp_path, capsys):
    out = tmp_path / "real"
    args = ["features", "--dataset", str(demo_data / "real"), "--layout", "cityscapes", "--split", "val",
            "--levels", "1,2x8", "--out", str(out)]
    assert main(args) == 0
    assert "8 samples" in capsys.readouterr().out
    assert_features_equal(out, expected_features(demo_data / "real", "cityscapes", "val", levels="1,2x8"))
    assert features_meta(str(out))["domain"] == "real"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_s3_dataset_and_output(s3_bucket, demo_data, tmp_path):
    data = f"{s3_bucket}/demo"
    make_demo_data(data, num_syn=6, num_real=4, num_val=0, height=64, width=128, seed=3, progress=False)
    out = f"{s3_bucket}/features/syn"
    rec = run_features(FeaturesConfig(dataset=f"{data}/syn", layout="synscapes", out=out, batch_size=2))
    assert rec["rows"] == 6
    assert storage.is_complete(out)
    got = load_features(out)
    assert all(u.startswith(f"{data}/syn/img/class/") for u in load_features(out, columns=("id", "label_uri"))["label_uri"])
    local = tmp_path / "local"
    make_demo_data(str(local), num_syn=6, num_real=4, num_val=0, height=64, width=128, seed=3, progress=False)
    expected = expected_features(local / "syn", "synscapes")
    assert list(got["id"]) == sorted(expected)
    for i, f in zip(got["id"], got["feature"]):
        np.testing.assert_array_equal(f, expected[i])


def test_console_script_on_s3(s3_bucket):
    """The installed `synreal` entry point, in its own process and Ray instance, against S3."""
    run_cli("make-demo-data", "--out", f"{s3_bucket}/d", "--num-syn", "2", "--num-real", "3", "--num-val", "0",
            "--height", "32", "--width", "64")
    p = run_cli("features", "--dataset", f"{s3_bucket}/d/real", "--layout", "cityscapes", "--out", f"{s3_bucket}/f")
    assert "3 samples" in p.stdout
    assert storage.is_complete(f"{s3_bucket}/f")
    assert Path(sys.executable).with_name("synreal").exists()


# --- bad input: a clear message naming the file, and nothing published ---

def _corrupt(root: Path, how: str) -> str:
    lab, img = root / "img/class/2.png", root / "img/rgb/2.png"
    if how == "truncated label":
        lab.write_bytes(lab.read_bytes()[:60])
        return str(lab), "unreadable or truncated label map"
    if how == "unreadable image":
        img.write_bytes(b"this is not a png")
        return str(img), "unreadable image"
    if how == "size mismatch":
        Image.fromarray(np.full((10, 20), 7, np.uint8)).save(lab)
        return str(lab), "label map is 20x10 but its image"
    if how == "label id outside table":
        a = np.asarray(Image.open(lab)).copy()
        a[0, 0] = 77
        Image.fromarray(a).save(lab)
        return str(lab), r"label ID\(s\) \[77\] outside the Cityscapes table"
    if how == "colour label":
        Image.open(lab).convert("RGB").save(lab)
        return str(lab), "mode RGB"
    if how == "image without label":
        lab.unlink()
        return str(img), "image has no label map"
    raise AssertionError(how)


BAD = ["truncated label", "unreadable image", "size mismatch", "label id outside table", "colour label",
       "image without label"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_fails_clearly_and_publishes_nothing(how, demo_data, tmp_path, capsys):
    root = tmp_path / "syn"
    shutil.copytree(demo_data / "syn", root)
    uri, message = _corrupt(root, how)
    out = tmp_path / "out"
    assert main(["features", "--dataset", str(root), "--layout", "synscapes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and uri in err
    assert re.search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not storage.is_complete(str(out))


@pytest.mark.parametrize("how", ["truncated label", "image without label"])
def test_on_error_skip_records_the_file(how, demo_data, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(demo_data / "syn", root)
    uri, message = _corrupt(root, how)
    out = tmp_path / "out"
    rec = run_features(FeaturesConfig(dataset=str(root), layout="synscapes", out=str(out), on_error="skip", batch_size=5))
    assert rec["rows"] == 23 and rec["errors"] == 1
    errors = pq.read_table(out / "errors").to_pylist()
    assert len(errors) == 1 and errors[0]["uri"] == uri
    assert re.search(message, errors[0]["reason"])
    assert "img/rgb/2" not in set(load_features(str(out))["id"])


def test_oversized_files_are_recorded_errors_with_on_error_skip(demo_data, tmp_path, capsys):
    # A low limit instead of huge files: demo samples are 128x64 = 8192 pixels, under 10000.
    root = tmp_path / "syn"
    shutil.copytree(demo_data / "syn", root)
    big_label, big_image = root / "img/class/2.png", root / "img/rgb/3.png"
    Image.fromarray(np.full((100, 120), 7, np.uint8)).save(big_label)  # 12000: PIL alone would only warn
    Image.new("RGB", (160, 160)).save(big_image)  # 25600: over twice the limit, PIL raises
    out = tmp_path / "out"
    assert main(["features", "--dataset", str(root), "--layout", "synscapes", "--out", str(out),
                 "--on-error", "skip", "--max-pixels", "10000"]) == 0
    assert "22 samples (2 skipped for errors)" in capsys.readouterr().out
    errors = {e["uri"]: e["reason"] for e in pq.read_table(out / "errors").to_pylist()}
    assert errors == {  # recorded under the sample's label file (as every sample error); the reason names the file
        str(big_label): f"{big_label}: label map of 12000 pixels is over the limit of 10000 "
                        f"(max_pixels, --max-pixels; a decompression bomb?)",
        str(root / "img/class/3.png"): f"{big_image}: image of 25600 pixels is over the limit of 10000 "
                                       f"(max_pixels, --max-pixels; a decompression bomb?)"}
    assert not {"img/rgb/2", "img/rgb/3"} & set(load_features(str(out))["id"])


def test_max_pixels_setting(demo_data):
    from synreal_ray.datasets.images import MAX_PIXELS
    from synreal_ray.features import SampleError, features_of_sample

    assert FeaturesConfig(dataset="d", layout="gta5", out="o").max_pixels == MAX_PIXELS
    with pytest.raises(ValueError, match="max_pixels"):
        FeaturesConfig(dataset="d", layout="gta5", out="o", max_pixels=0)
    image, label = str(demo_data / "syn/img/rgb/0.png"), str(demo_data / "syn/img/class/0.png")
    assert features_of_sample(image, label, (1,), max_pixels=8192)[:2] == (64, 128)
    with pytest.raises(SampleError, match=f"^{re.escape(label)}: label map of 8192 pixels is over the limit of 8191 "):
        features_of_sample(image, label, (1,), max_pixels=8191)


def test_empty_and_wrong_layout_datasets(tmp_path, demo_data, capsys):
    assert main(["features", "--dataset", str(tmp_path / "nothing"), "--layout", "gta5", "--out", str(tmp_path / "o")]) == 2
    assert "no images found for layout 'gta5'" in capsys.readouterr().err
    assert main(["features", "--dataset", str(demo_data / "real"), "--layout", "synscapes", "--out", str(tmp_path / "o")]) == 2
    assert "looks like the 'cityscapes' layout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_partial_output_of_a_killed_run_is_replaced(demo_data, tmp_path):
    from synreal_ray.stage import Stage

    out = tmp_path / "out"
    assert Stage("features", str(out), {"other": "settings"}).begin()  # the marker, written first
    (out / "features").mkdir(parents=True)
    # what a killed run leaves: its marker and lease, some parts, a stale file, and no _SUCCESS
    junk = out / "features" / "part-0000000000000000.parquet"
    shutil.copy(next(iter(Path(demo_data / "syn/img/class").glob("*.png"))), junk)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_features(str(out))
    rec = run_features(FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=str(out)))
    assert rec["rows"] == 24 and not junk.exists()
    assert len(load_features(str(out))["id"]) == 24
