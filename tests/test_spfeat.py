import numpy as np
import pytest

from synreal_ray.spfeat import feature_dim, levels_str, parse_levels, sp_feat, sp_feat_reference


def test_hand_computed_two_levels():
    labels = np.array([[0, 1, 255],
                       [2, 2, 1]], dtype=np.uint8)
    # level 1: 5 valid pixels; level 2: rows [0,1,2], cols (arange(3)*3)//2 = [0,1,3]
    expected = [0.2, 0.4, 0.4,
                1, 0, 0,   0, 1, 0,
                0, 0, 1,   0, 0.5, 0.5]
    np.testing.assert_allclose(sp_feat(labels, num_classes=3, levels=(1, 2)), expected, rtol=0, atol=1e-7)


def test_odd_size_not_divisible_by_grid():
    # 5 x 7 map, 2 x 2 grid: row bounds [0, 2, 5], column bounds [0, 3, 7].
    labels = np.zeros((5, 7), dtype=np.uint8)
    labels[:2, 3:] = 1
    labels[2:, :3] = 2
    labels[2:, 3:] = 3
    labels[4, 6] = 0  # one pixel of class 0 in the bottom-right cell of 3 x 4 = 12 pixels
    f = sp_feat(labels, num_classes=4, levels=(2,)).reshape(4, 4)
    np.testing.assert_allclose(f[0], [1, 0, 0, 0])
    np.testing.assert_allclose(f[1], [0, 1, 0, 0])
    np.testing.assert_allclose(f[2], [0, 0, 1, 0])
    np.testing.assert_allclose(f[3], [1 / 12, 0, 0, 11 / 12], atol=1e-7)


def test_all_ignore_cell_is_zero_and_other_cells_unaffected():
    labels = np.full((4, 4), 255, dtype=np.uint8)
    labels[2:, 2:] = 5
    f = sp_feat(labels, num_classes=6, levels=(1, 2))
    np.testing.assert_allclose(f[:6], [0, 0, 0, 0, 0, 1])  # level 1 only counts valid pixels
    cells = f[6:].reshape(4, 6)
    assert not cells[:3].any()
    np.testing.assert_allclose(cells[3], [0, 0, 0, 0, 0, 1])


def test_fully_ignored_map_is_all_zeros():
    assert not sp_feat(np.full((3, 5), 255, np.uint8), levels=(1, 2)).any()


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (31, 64), (128, 257)])
@pytest.mark.parametrize("levels", [(1, 2, 4), "2x8", "1,3x5"])
def test_matches_loop_definition_on_random_maps(shape, levels):
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 19, size=shape).astype(np.uint8)
    labels[rng.random(shape) < 0.2] = 255
    np.testing.assert_allclose(sp_feat(labels, levels=levels), sp_feat_reference(labels, levels=levels), atol=1e-6)


def test_length_and_rows_sum_to_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 19, size=(40, 80)).astype(np.uint8)
    f = sp_feat(labels, levels=(1, 2, 4))
    assert f.dtype == np.float32 and f.shape == (19 * 21,) == (feature_dim((1, 2, 4)),)
    np.testing.assert_allclose(f.reshape(-1, 19).sum(1), 1.0, atol=1e-6)


def test_parse_levels():
    assert parse_levels("1,2,4") == ((1, 1), (2, 2), (4, 4))
    assert parse_levels("2x8") == ((2, 8),)
    assert parse_levels((1, (2, 3))) == ((1, 1), (2, 3))
    assert levels_str("1, 2x8") == "1x1,2x8"
    for bad in ("", "0", "2x", "a", "-1"):
        with pytest.raises(ValueError, match="level"):
            parse_levels(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"train IDs \[19\]"):
        sp_feat(np.array([[0, 19]], np.uint8))
    with pytest.raises(ValueError, match="H, W"):
        sp_feat(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        sp_feat(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_label_features_of_raw_ids_equal_the_definition_on_train_ids(tmp_path, mode):
    """The features stage counts raw label IDs per fine cell (Pillow's histogram for 8-bit maps)
    and maps the counts through the label table: the same vector as mapping every pixel first."""
    from PIL import Image

    from synreal_ray.datasets.labels import LABEL_TO_TRAIN, to_train_ids
    from synreal_ray.features import SampleError, label_features

    known = np.flatnonzero(LABEL_TO_TRAIN != 254)  # every label ID in the table, ignored ones included
    rng = np.random.default_rng(len(mode))
    ids = rng.choice(known, size=(37, 53)).astype(np.uint8)
    path = tmp_path / "lab.png"
    if mode == "P":
        img = Image.frombytes("P", (53, 37), ids.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    else:
        img = Image.fromarray(ids.astype(np.uint16) if mode == "I;16" else ids)
    img.save(path)
    assert Image.open(path).mode == mode
    shape, feat = label_features(str(path), "1,2,3x5")
    assert shape == (37, 53)
    np.testing.assert_allclose(feat, sp_feat_reference(to_train_ids(ids), levels="1,2,3x5"), atol=1e-6)

    ids[3, 4], ids[30, 50] = 77, 200
    (Image.fromarray(ids) if mode != "I;16" else Image.fromarray(ids.astype(np.uint16))).save(path)
    with pytest.raises(SampleError, match=r"lab.png: label ID\(s\) \[77, 200\] outside the Cityscapes table"):
        label_features(str(path), "1,2")
