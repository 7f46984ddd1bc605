"""Age datasets: the digits-rotation stand-in, and the IMDB-WIKI / UTKFace loaders on tiny fixtures
written in each dataset's real format."""
import datetime as dt

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from experiments.age.data import (age_at_photo, load_digits_rotation, load_imdb_wiki, load_utkface,
                                  matlab_datenum_to_date, parse_utkface_name, read_age_list, read_imdb_wiki_mat,
                                  rotated_digits)
from experiments.age.model import AgeResNet


def datenum(date: dt.date) -> float:
    return float(date.toordinal() + 366)  # MATLAB counts from year 0


def write_image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# --- digits-rotation ---------------------------------------------------------------------------------
def test_rotated_digits_shapes_range_and_determinism():
    images, angles, index = rotated_digits(seed=0, copies=2, image_size=16, limit=20)
    assert images.shape == (20, 1, 16, 16) and images.dtype == np.float32
    assert angles.min() >= 0 and angles.max() < 180
    np.testing.assert_array_equal(index, np.repeat(np.arange(10), 2))
    again, angles_again, _ = rotated_digits(seed=0, copies=2, image_size=16, limit=20)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(angles, angles_again)
    # The image does depend on the angle: rotating by 90 degrees moves the ink.
    assert np.abs(images[0] - images[1]).mean() > 0.01


def test_digits_split_is_by_digit_and_labelled_stand_in():
    split = load_digits_rotation(seed=0, copies=2, limit=80)
    assert len(split.train) + len(split.test) == 80
    assert split.info["stand_in"] is True and "STAND-IN" in split.info["description"]
    image, age = split.train[0]
    assert image.shape == (1, 16, 16) and 0 <= float(age) < 180
    coarse = split.coarse(split.test_ages)
    np.testing.assert_array_equal(coarse, (split.test_ages >= np.median(split.train_ages)).astype(np.int64))


def test_limit_counts_samples_not_digits():
    # --limit N: at most N samples whatever --copies is (it used to count digits: N x copies samples).
    for copies, limit in ((1, 30), (3, 30), (3, 31), (4, 7)):
        images, angles, index = rotated_digits(seed=0, copies=copies, image_size=8, limit=limit)
        assert len(images) == len(angles) == len(index) == limit
        assert index.max() + 1 == -(-limit // copies)  # the first digits, all copies of each but the last
    assert len(load_digits_rotation(seed=0, copies=3, image_size=8, limit=50).train_ages) < 50


# --- IMDB-WIKI ---------------------------------------------------------------------------------------
def test_matlab_dates_and_age_rule():
    assert matlab_datenum_to_date(datenum(dt.date(1980, 3, 15))) == dt.date(1980, 3, 15)
    assert age_at_photo(datenum(dt.date(1980, 3, 15)), 2010) == 30
    assert age_at_photo(datenum(dt.date(1980, 9, 15)), 2010) == 29  # born after mid-year


@pytest.fixture
def imdb_fixture(tmp_path):
    """A tiny imdb_crop/: imdb.mat (a MATLAB struct, the real layout) plus images in numbered folders."""
    root = tmp_path / "imdb_crop"
    rows = [  # (path, dob, photo year, face_score, second_face_score, kept?)
        ("01/a_1.jpg", dt.date(1980, 3, 1), 2010, 3.5, np.nan, True),
        ("01/b_2.jpg", dt.date(1990, 8, 1), 2000, 1.2, np.nan, True),
        ("02/c_3.jpg", dt.date(1950, 1, 1), 2000, 0.5, np.nan, False),      # face score too low
        ("02/d_4.jpg", dt.date(1970, 1, 1), 2000, 2.0, 1.1, False),         # a second face
        ("03/e_5.jpg", dt.date(1900, 1, 1), 2010, 2.0, np.nan, False),      # age 110 > 100
        ("03/f_6.jpg", dt.date(1985, 1, 1), 2005, -np.inf, np.nan, False),  # no face found
        ("04/g_7.jpg", dt.date(2001, 2, 1), 2009, 4.0, np.nan, True),
        ("04/h_8.jpg", dt.date(1960, 5, 5), 1999, 2.5, np.nan, True),
        ("05/i_9.jpg", dt.date(1975, 12, 1), 2004, 1.0, np.nan, True),
        ("05/j_10.jpg", dt.date(1975, 12, 1), np.nan, 3.0, np.nan, False),  # no photo year: int(nan) crashed
    ]
    for i, row in enumerate(rows):
        write_image(root / row[0], i)
    struct = {
        "dob": np.array([[datenum(r[1]) for r in rows]]),
        "photo_taken": np.array([[r[2] for r in rows]], dtype=np.float64),
        "full_path": np.array([[r[0] for r in rows]], dtype=object),
        "gender": np.ones((1, len(rows))),
        "name": np.array([[f"person {i}" for i in range(len(rows))]], dtype=object),
        "face_location": np.empty((1, len(rows)), dtype=object),
        "face_score": np.array([[r[3] for r in rows]]),
        "second_face_score": np.array([[r[4] for r in rows]]),
    }
    for i in range(len(rows)):
        struct["face_location"][0, i] = np.array([[1.0, 2.0, 3.0, 4.0]])
    savemat(root / "imdb.mat", {"imdb": struct})
    kept = [(r[0], age_at_photo(datenum(r[1]), r[2])) for r in rows if r[5]]
    return root, kept


def test_imdb_mat_reader_filters_like_the_paper(imdb_fixture):
    root, kept = imdb_fixture
    paths, ages = read_imdb_wiki_mat(root / "imdb.mat")
    assert paths == [p for p, _ in kept]
    np.testing.assert_array_equal(ages, [a for _, a in kept])
    assert list(ages[:2]) == [30, 9]


def test_imdb_loader_from_mat_and_folder(imdb_fixture):
    root, kept = imdb_fixture
    for source in (root / "imdb.mat", root):
        split = load_imdb_wiki(source, image_size=16, seed=0)
        assert len(split.train) + len(split.test) == len(kept)
        image, age = split.train[0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert split.info["stand_in"] is False


def test_imdb_loader_from_tab_separated_list(imdb_fixture, tmp_path):
    root, kept = imdb_fixture
    listing = tmp_path / "imdb_list.tsv"
    lines = ["full_path\tage\tgender"] + [f"{p}\t{a}\t1" for p, a in kept] + ["01/a_1.jpg\t130\t0"]
    listing.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 line"):
        paths, ages = read_age_list(listing)
    assert paths == [p for p, _ in kept] and list(ages) == [a for _, a in kept]  # header and age 130 skipped
    listing.write_text("\n".join(lines[:-1]) + "\n")
    split = load_imdb_wiki(listing, images=root, image_size=8)
    assert sorted(np.concatenate([split.train_ages, split.test_ages])) == sorted(a for _, a in kept)


def test_imdb_loader_errors(imdb_fixture, tmp_path):
    root, _ = imdb_fixture
    with pytest.raises(FileNotFoundError):
        load_imdb_wiki(tmp_path / "nothing.mat")
    listing = tmp_path / "list.tsv"
    listing.write_text("missing/x.jpg\t30\t1\nmissing/y.jpg\t40\t1\nmissing/z.jpg\t50\t1\nmissing/w.jpg\t60\t1\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_imdb_wiki(listing, images=root)
    savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="imdb"):
        read_imdb_wiki_mat(tmp_path / "other.mat")


# --- UTKFace -----------------------------------------------------------------------------------------
def test_utkface_names():
    assert parse_utkface_name("23_1_2_20170116174525125.jpg.chip.jpg") == 23
    assert parse_utkface_name("100_0_0_20170112213500903.jpg") == 100
    assert parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg") is None  # a known malformed name
    assert parse_utkface_name("readme.jpg") is None


def test_utkface_loader(tmp_path):
    ages = [1, 8, 23, 35, 47, 60, 71, 90]
    for i, age in enumerate(ages):
        write_image(tmp_path / "UTKFace" / f"{age}_{i % 2}_{i % 5}_2017011617452{i}.jpg.chip.jpg", i)
    write_image(tmp_path / "UTKFace" / "61_1_20170109142408075.jpg.chip.jpg", 99)  # malformed: skipped
    with pytest.warns(UserWarning, match="skipped 1"):
        split = load_utkface(tmp_path / "UTKFace", image_size=12, seed=1)
    assert sorted(np.concatenate([split.train_ages, split.test_ages])) == ages
    image, age = split.test[0]
    assert image.shape == (3, 12, 12) and float(age) in ages
    with pytest.raises(FileNotFoundError):
        load_utkface(tmp_path / "absent")


def test_utkface_duplicate_names_are_dropped_with_a_warning(tmp_path):
    # The real download has UTKFace/ and crop_part1/ holding the same file names: one photo must not land
    # in both train and test.
    names = [f"{age}_0_1_2017011617452{i}.jpg.chip.jpg" for i, age in enumerate([5, 15, 25, 35, 45, 55])]
    for i, name in enumerate(names):
        write_image(tmp_path / "UTKFace" / name, i)
    for i, name in enumerate(names[:4]):
        write_image(tmp_path / "crop_part1" / name, 10 + i)
    with pytest.warns(UserWarning, match="4 file names occur more than once"):
        split = load_utkface(tmp_path, image_size=8, seed=0)
    assert len(split.train) + len(split.test) == 6
    listed = [p.name for p in split.train.paths + split.test.paths]
    assert sorted(listed) == sorted(names)


# --- model -------------------------------------------------------------------------------------------
def test_age_model_layout():
    model = AgeResNet(in_channels=3)
    logits, feature = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 2) and feature.shape == (2, 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 2 * 8  # stem + 8 basic blocks of 2 convs: ResNet-18
    assert convs[0].stride == (1, 1) and convs[0].out_channels == 16
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.classifier.in_features == 1
