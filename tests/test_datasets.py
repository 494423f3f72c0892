import shutil

import numpy as np
import pytest
from PIL import Image

from synreal_ray import storage
from synreal_ray.datasets.demo import make_demo_data, make_layout
from synreal_ray.datasets.labels import LABEL_ID_OF_TRAIN, NUM_CLASSES, TRAIN_ID, to_train_ids
from synreal_ray.datasets.layouts import list_dataset


def test_label_table():
    ids = np.array([[7, 8, 11, 26], [0, 23, 33, 9]], dtype=np.uint8)
    np.testing.assert_array_equal(to_train_ids(ids), [[0, 1, 2, 13], [255, 10, 18, 255]])
    np.testing.assert_array_equal(to_train_ids(LABEL_ID_OF_TRAIN), np.arange(NUM_CLASSES))
    with pytest.raises(ValueError, match=r"label ID\(s\) \[34, 200\] outside the Cityscapes table"):
        to_train_ids(np.array([[34, 7, 200]], dtype=np.uint8))


def test_demo_layouts_are_listed_with_stable_relative_ids(demo_data):
    syn, problems = list_dataset(str(demo_data / "syn"), "synscapes")
    assert not problems and len(syn) == 24
    assert syn[0].id == "img/rgb/0" and syn[0].label_uri.endswith("img/class/0.png")
    train, _ = list_dataset(str(demo_data / "real"), "cityscapes", "train")
    val, _ = list_dataset(str(demo_data / "real"), "cityscapes", "val")
    assert len(train) == 16 and len(val) == 8
    s = train[0]
    assert s.id.startswith("leftImg8bit/train/") and s.id.endswith("_leftImg8bit")
    assert s.label_uri.replace("gtFine_labelIds", "leftImg8bit").replace("/gtFine/", "/leftImg8bit/") == s.image_uri


def test_gta5_and_folder_layouts(demo_data, tmp_path):
    src, _ = list_dataset(str(demo_data / "syn"), "synscapes")
    gta, folder = tmp_path / "gta", tmp_path / "folder"
    for d in ("images", "labels"):
        (gta / d).mkdir(parents=True)
        (folder / d).mkdir(parents=True)
    for i, s in enumerate(src[:5]):
        shutil.copy(s.image_uri, gta / "images" / f"{i:05d}.png")
        shutil.copy(s.label_uri, gta / "labels" / f"{i:05d}.png")
        Image.open(s.image_uri).convert("RGB").save(folder / "images" / f"frame_{i}.jpg")  # any extension
        shutil.copy(s.label_uri, folder / "labels" / f"frame_{i}.png")
    g, gp = list_dataset(str(gta), "gta5")
    f, fp = list_dataset(str(folder), "folder")
    assert not gp and not fp
    assert [x.id for x in g] == [f"images/{i:05d}" for i in range(5)]
    assert [x.id for x in f] == [f"images/frame_{i}" for i in range(5)]
    assert all(x.label_uri.endswith(x.id.split("/")[-1] + ".png") for x in f)


def test_image_without_label_is_a_problem(demo_data, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(demo_data / "syn", root)
    (root / "img/class/3.png").unlink()
    samples, problems = list_dataset(str(root), "synscapes")
    assert len(samples) == 23
    assert len(problems) == 1 and problems[0].uri.endswith("img/rgb/3.png") and "no label" in problems[0].reason


def test_empty_and_wrong_layout(demo_data, tmp_path):
    with pytest.raises(ValueError, match="no images found for layout 'gta5'"):
        list_dataset(str(tmp_path), "gta5")
    with pytest.raises(ValueError, match="looks like the 'synscapes' layout"):
        list_dataset(str(demo_data / "syn"), "cityscapes")
    with pytest.raises(ValueError, match="unknown layout"):
        list_dataset(str(tmp_path), "kitti")


def test_demo_data_is_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_demo_data(str(a), num_syn=3, num_real=2, num_val=1, height=32, width=64, seed=7, progress=False)
    make_demo_data(str(b), num_syn=2, num_real=2, num_val=1, height=32, width=64, seed=7, progress=False)
    files_b = [f.relative_to(b) for f in sorted(b.rglob("*.png"))]
    assert files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_b)
    c = tmp_path / "c"
    make_demo_data(str(c), num_syn=1, num_real=1, num_val=0, height=32, width=64, seed=8, progress=False)
    assert (a / "syn/img/rgb/0.png").read_bytes() != (c / "syn/img/rgb/0.png").read_bytes()


def test_demo_domains_differ_in_layout_statistics():
    def share(domain, cls):
        return np.mean([(make_layout(np.random.default_rng([1, i]), 64, 128, domain) == TRAIN_ID[cls]).mean()
                        for i in range(60)])

    assert share("syn", "car") > 1.5 * share("real", "car")
    assert share("syn", "person") > 1.5 * share("real", "person")
    assert share("real", "vegetation") > 1.5 * share("syn", "vegetation")


def test_demo_real_look_differs_from_synthetic_look(demo_data):
    syn = np.asarray(Image.open(demo_data / "syn/img/rgb/0.png"), dtype=np.float32)
    real_file = next((demo_data / "real/leftImg8bit/train").rglob("*.png"))
    real = np.asarray(Image.open(real_file), dtype=np.float32)
    # flat colours: few distinct colours; real look: texture noise gives thousands
    assert len(np.unique(syn.reshape(-1, 3), axis=0)) < 25
    assert len(np.unique(real.reshape(-1, 3), axis=0)) > 1000


def test_storage_join_and_relpath():
    assert storage.join("s3://b/p", "x", "y.png") == "s3://b/p/x/y.png"
    assert storage.relpath("s3://b/p/x/y.png", "s3://b/p") == "x/y.png"
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")
