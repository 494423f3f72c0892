import re
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
    with pytest.raises(ValueError, match=r"label ID\(s\) \[77\] outside"):  # beside ignored pixels (0 -> 255)
        to_train_ids(np.array([[0, 77, 7]], dtype=np.uint8))


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


# --- paths taken from data stay plain; outputs stay under their root ---

@pytest.mark.parametrize("rel", ["../x", "/x", "a/../b", "", "a//b", "./a", "a/.", "..\\x"])
def test_safe_join_refuses_paths_that_are_not_plain(rel):
    with pytest.raises(ValueError, match="not a plain relative path"):
        storage.safe_join("/out", rel)


def test_safe_join_keeps_plain_paths_under_the_root():
    assert storage.safe_join("s3://b/out", "img/rgb/3.png") == "s3://b/out/img/rgb/3.png"
    assert storage.safe_join("/out", "a/b.png") == "/out/a/b.png"


def test_listed_files_whose_path_is_not_plain_are_refused():
    # An S3 key may hold `..`, `.` or empty parts (AWS accepts them; the SeaweedFS of the tests
    # refuses to store them), so the check runs on the listed paths, verbatim.
    from synreal_ray.datasets.layouts import _plain_files, is_plain_relative

    root = "s3://b/ds"
    bad = ["s3://b/ds/images/../../etc/evil.png", "s3://b/ds/images//x.png", "s3://b/ds/images/./y.png",
           "s3://b/ds/images/a/../z.png"]
    ok, problems = _plain_files(["s3://b/ds/images/ok.png", *bad], root)
    assert ok == ["s3://b/ds/images/ok.png"]
    assert [p.uri for p in problems] == bad
    assert all("not a plain relative path" in p.reason for p in problems)
    assert "'images/../../etc/evil.png'" in problems[0].reason
    assert not is_plain_relative("/abs/x.png") and not is_plain_relative("") and is_plain_relative("a/b.png")
    with pytest.raises(ValueError, match="not inside it"):
        _plain_files(["s3://b/other/x.png"], root)


@pytest.mark.parametrize("split", ["../real", "train/aachen", "", ".", "..", "a\\b"])
def test_bad_cityscapes_split_is_refused(demo_data, split):
    from synreal_ray.datasets.layouts import image_root

    with pytest.raises(ValueError, match=r"split .*: must be one folder name"):
        list_dataset(str(demo_data / "real"), "cityscapes", split)
    with pytest.raises(ValueError, match=r"split .*: must be one folder name"):
        image_root(str(demo_data / "real"), "cityscapes", split)


def test_bad_split_is_one_error_line_on_the_command_line(demo_data, tmp_path, capsys):
    from synreal_ray.cli import main

    out = tmp_path / "o"
    assert main(["features", "--dataset", str(demo_data / "real"), "--layout", "cityscapes", "--split", "../real",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'../real'" in err and "must be one folder name" in err and err.count("\n") == 1
    assert not out.exists()


def _tiny_png(path, mode="L", size=(4, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_folder_layout_matches_by_relative_path_in_subfolders(tmp_path):
    root = tmp_path / "folder"
    for rel in ("a/1.jpg", "b/1.png", "2.png", "c/3.png"):
        _tiny_png(root / "images" / rel, "RGB")
    for rel in ("a/1.png", "b/1.png", "2.png", "3.png"):  # 3.png is not in c/: no match
        _tiny_png(root / "labels" / rel)
    samples, problems = list_dataset(str(root), "folder")
    assert [(s.id, s.label_uri[len(str(root)) + 1:]) for s in samples] == [
        ("images/2", "labels/2.png"), ("images/a/1", "labels/a/1.png"), ("images/b/1", "labels/b/1.png")]
    assert samples[1].image_uri.endswith("images/a/1.jpg")
    assert [(p.uri, p.reason) for p in problems] == [(str(root / "images/c/3.png"), "image has no label map")]


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_folder_layout_refuses_names_differing_only_in_extension(tmp_path, folder):
    root = tmp_path / "folder"
    for sub in ("images", "labels"):
        _tiny_png(root / sub / "x" / "a.png", "RGB" if sub == "images" else "L")
    Image.open(root / folder / "x" / "a.png").save(root / folder / "x" / "a.jpg")
    with pytest.raises(ValueError) as e:
        list_dataset(str(root), "folder")
    msg = str(e.value)
    assert str(root / folder / "x" / "a.jpg") in msg and str(root / folder / "x" / "a.png") in msg
    assert "same path apart from the extension" in msg and "\n" not in msg


def test_run_names_dot_and_dotdot_are_refused():
    from synreal_ray.config import ConfigError
    from synreal_ray.pipeline import RunSpec

    for name in (".", "..", "", "a/b"):
        with pytest.raises(ConfigError, match="run name"):
            RunSpec(name)
    assert RunSpec("unit.v2").name == "unit.v2"


# --- the pixel limit: an oversized image is an error naming the file, never a crash ---

def _png_bytes(size, mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_refuses_more_pixels_than_the_limit():
    from synreal_ray.datasets.images import MAX_PIXELS, ImageError, decode_image

    assert MAX_PIXELS > 2048 * 1024 * 16  # far above Cityscapes frames
    before = Image.MAX_IMAGE_PIXELS
    assert decode_image(_png_bytes((100, 100)), "ok.png", max_pixels=10_000).size == (100, 100)
    # 12000 pixels: PIL would only warn (up to twice its limit); 25600: PIL raises. Both refused.
    for size, n in (((120, 100), 12_000), ((160, 160), 25_600)):
        for load in (True, False):
            with pytest.raises(ImageError, match=rf"^big\.png: image of {n} pixels is over the limit of 10000"):
                decode_image(_png_bytes(size), "big.png", max_pixels=10_000, load=load)
    with pytest.raises(ImageError, match=r"^bad\.png: unreadable or truncated label map"):
        decode_image(b"not a png", "bad.png", "label map")
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global limit is put back


def test_translate_and_train_decode_through_the_pixel_limit(tmp_path, monkeypatch):
    from synreal_ray.datasets import images
    from synreal_ray.train import read_training_image
    from synreal_ray.translate import decode_rgb

    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes((64, 32)))
    assert decode_rgb(path.read_bytes(), str(path)).shape == (32, 64, 3)
    assert read_training_image(str(path), (16, 16)).shape == (16, 16, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # the module default, read at each call
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: image of 2048 pixels is over the limit of 1000"):
        decode_rgb(path.read_bytes(), str(path))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: image of 2048 pixels is over the limit of 1000"):
        read_training_image(str(path), (16, 16))
