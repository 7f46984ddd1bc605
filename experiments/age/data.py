"""Age data: the built-in digits-rotation stand-in, IMDB-WIKI and UTKFace.

Every dataset yields (image tensor, age); ``AgeSplit`` holds a train and a test ``Dataset`` plus the
ages, and the coarse label of a sample is ``age >= median(training ages)`` (0 = the younger half).

``digits-rotation`` (default, offline): no face dataset can be installed offline, so the default is an
honest STAND-IN with a real continuous target playing the same role. The 1797 real handwritten digits
bundled with scikit-learn (8 x 8) are upsampled to 12 x 12, padded to 16 x 16 and rotated by an angle
drawn uniformly in [0, 180) degrees; the angle (in degrees) plays the age. Digits that look alike after
a half-turn (0, 1, 8) make angles near 0 and near 180 hard to tell apart, as real faces make some ages.
"""
from __future__ import annotations

import datetime as dt
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, TensorDataset

DATASETS = ["digits-rotation", "imdb-wiki", "utkface"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class AgeSplit:
    train: Dataset
    test: Dataset
    train_ages: np.ndarray
    test_ages: np.ndarray
    in_channels: int
    info: dict = field(default_factory=dict)

    @property
    def median_age(self) -> float:
        return float(np.median(self.train_ages))

    def coarse(self, ages: np.ndarray | torch.Tensor):
        """0 for ages below the training median (the younger half), 1 otherwise."""
        return (ages >= self.median_age).long() if isinstance(ages, torch.Tensor) else (ages >= self.median_age).astype(np.int64)


def split_indices(n_items: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n_items < 4:
        raise ValueError(f"need at least 4 samples to split, got {n_items}")
    order = np.random.default_rng(seed).permutation(n_items)
    n_train = min(max(int(round(train_fraction * n_items)), 2), n_items - 2)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


# --- digits-rotation stand-in ----------------------------------------------------------------------
def rotated_digits(seed: int = 0, copies: int = 1, image_size: int = 16, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images (N, 1, S, S) float32 in [0, 1], angles in degrees (N,), digit index (N,)).

    Each of the 1797 digits appears ``copies`` times, each with its own angle. Deterministic in ``seed``.
    ``limit`` caps the number of SAMPLES: the first ceil(limit / copies) digits, cut at ``limit`` samples.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    digits = load_digits().images.astype(np.float64) / 16.0  # (1797, 8, 8), values 0..16
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        digits = digits[:-(-limit // copies)]
    rng = np.random.default_rng(seed)
    inner = int(round(image_size * 0.75))  # leave a border so half-turned corners stay inside the frame
    pad = image_size - inner
    images, angles, index = [], [], []
    for i, digit in enumerate(digits):
        big = ndimage.zoom(digit, inner / 8.0, order=1)
        big = np.pad(big, ((pad // 2, pad - pad // 2),) * 2)
        for angle in rng.uniform(0.0, 180.0, size=copies):
            images.append(np.clip(ndimage.rotate(big, angle, reshape=False, order=1, mode="constant"), 0.0, 1.0))
            angles.append(angle)
            index.append(i)
    images, angles, index = images[:limit], angles[:limit], index[:limit]  # limit None: everything
    return (np.asarray(images, dtype=np.float32)[:, None], np.asarray(angles, dtype=np.float32),
            np.asarray(index, dtype=np.int64))


def load_digits_rotation(seed: int = 0, copies: int = 1, image_size: int = 16, train_fraction: float = 0.7,
                         limit: int | None = None) -> AgeSplit:
    images, angles, digit_index = rotated_digits(seed, copies, image_size, limit)
    # Split by digit, so the same handwritten digit never lands in both train and test.
    train_digits, _ = split_indices(int(digit_index.max()) + 1, train_fraction, seed)
    in_train = np.isin(digit_index, train_digits)
    mean, std = images[in_train].mean(), images[in_train].std()
    images = (images - mean) / std
    make = lambda mask: TensorDataset(torch.from_numpy(images[mask]), torch.from_numpy(angles[mask]))
    return AgeSplit(make(in_train), make(~in_train), angles[in_train], angles[~in_train], in_channels=1,
                    info={"name": "digits-rotation", "stand_in": True,
                          "description": "STAND-IN for face ages: scikit-learn's 1797 handwritten digits rotated by "
                                         "U[0, 180) degrees; the angle (degrees) plays the age",
                          "age_unit": "degrees", "image_size": image_size, "copies": copies})


# --- face datasets ---------------------------------------------------------------------------------
class FaceAgeDataset(Dataset):
    """Images read lazily from disk (PIL, which matplotlib already depends on), resized to a square."""

    def __init__(self, paths: list[Path], ages: np.ndarray, image_size: int = 64, channels: int = 3):
        if len(paths) != len(ages):
            raise ValueError(f"{len(paths)} images for {len(ages)} ages")
        self.paths, self.ages = list(paths), np.asarray(ages, dtype=np.float32)
        self.image_size, self.mode = image_size, {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert(self.mode).resize((self.image_size, self.image_size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        # Fixed normalisation (to about zero mean, unit spread) instead of per-dataset statistics.
        return torch.from_numpy((array - 0.5) / 0.25), torch.tensor(self.ages[index])


def matlab_datenum_to_date(datenum: float) -> dt.date:
    """MATLAB datenum (days since year 0, with 1 = 1 Jan 0000) -> date. Python ordinal 1 = 1 Jan 0001."""
    return dt.date.fromordinal(max(int(datenum) - 366, 1))


def age_at_photo(dob_datenum: float, photo_year: float) -> int:
    """Age when the photo was taken, assuming it was taken mid-year (1 July) as only the year is known."""
    birth = matlab_datenum_to_date(dob_datenum)
    return int(photo_year) - birth.year - (1 if birth.month >= 7 else 0)


def read_imdb_wiki_mat(path: Path) -> tuple[list[str], np.ndarray]:
    """(relative image paths, ages) from IMDB-WIKI's ``imdb.mat`` or ``wiki.mat`` metadata.

    Keeps the samples the paper keeps: face_score >= 1, no second face (second_face_score is NaN),
    0 <= age <= 100; rows without a date of birth or photo year are skipped too.
    """
    from scipy.io import loadmat

    mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    keys = [k for k in ("imdb", "wiki") if k in mat]
    if not keys:
        raise ValueError(f"{path}: no 'imdb' or 'wiki' struct in this .mat file (found {sorted(k for k in mat if not k.startswith('__'))})")
    meta = mat[keys[0]]
    try:
        full_path = np.atleast_1d(meta.full_path)
        dob = np.atleast_1d(meta.dob).astype(np.float64)
        taken = np.atleast_1d(meta.photo_taken).astype(np.float64)
        face_score = np.atleast_1d(meta.face_score).astype(np.float64)
        second = np.atleast_1d(meta.second_face_score).astype(np.float64)
    except AttributeError as error:
        raise ValueError(f"{path}: metadata struct lacks a field: {error}") from None
    if not (len(full_path) == len(dob) == len(taken) == len(face_score) == len(second)):
        raise ValueError(f"{path}: metadata fields have different lengths")
    paths, ages = [], []
    for rel, birth, year, score, score2 in zip(full_path, dob, taken, face_score, second):
        if (not (np.isfinite(score) and score >= 1.0) or np.isfinite(score2) or not np.isfinite(birth) or birth < 367
                or not np.isfinite(year)):
            continue
        age = age_at_photo(birth, year)
        if 0 <= age <= 100:
            paths.append(str(np.atleast_1d(rel)[0]))
            ages.append(age)
    return paths, np.asarray(ages, dtype=np.float32)


def read_age_list(path: Path) -> tuple[list[str], np.ndarray]:
    """(image paths, ages) from a tab-separated ``path<TAB>age<TAB>gender`` list (header optional).

    This is the file list the paper's preprocessing writes from the .mat metadata; lines whose age is
    not a number in [0, 100] are skipped (a header line among them).
    """
    paths, ages, skipped = [], [], 0
    with open(path, newline="") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_number}: expected 'path<TAB>age[<TAB>gender]', got {line.strip()!r}")
            try:
                age = float(parts[1])
            except ValueError:
                skipped += line_number > 1  # a non-numeric first line is the header
                continue
            if not (math.isfinite(age) and 0 <= age <= 100):
                skipped += 1
                continue
            paths.append(parts[0])
            ages.append(age)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} lines without an age in [0, 100]")
    return paths, np.asarray(ages, dtype=np.float32)


def load_imdb_wiki(root: Path, images: Path | None = None, **kwargs) -> AgeSplit:
    """``root``: imdb.mat / wiki.mat, a tab-separated list, or a folder holding one of them.
    Image paths are relative to ``images`` (default: the metadata file's folder, as in imdb_crop/)."""
    root = Path(root)
    if root.is_dir():
        candidates = [root / n for n in ("imdb.mat", "wiki.mat")] + sorted(root.glob("*.tsv")) + sorted(root.glob("*.txt"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{root}: no imdb.mat, wiki.mat or .tsv/.txt file list in this folder")
        root = found[0]
    if not root.is_file():
        raise FileNotFoundError(f"imdb-wiki metadata {root} not found")
    rel_paths, ages = read_imdb_wiki_mat(root) if root.suffix == ".mat" else read_age_list(root)
    base = Path(images) if images is not None else root.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in rel_paths]
    return _face_split(paths, ages, {"name": "imdb-wiki", "metadata": str(root), "images": str(base)}, **kwargs)


def parse_utkface_name(name: str) -> int | None:
    """Age from a UTKFace file name ``age_gender_race_datetime.jpg[.chip.jpg]``, None if malformed."""
    parts = name.split("_")
    if len(parts) < 4 or not parts[0].isdigit():
        return None
    return int(parts[0])


def load_utkface(root: Path, **kwargs) -> AgeSplit:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"UTKFace folder {root} not found")
    paths, ages, skipped, seen, duplicates = [], [], 0, {}, []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        age = parse_utkface_name(path.name)
        if age is None:
            skipped += 1
            continue
        if path.name in seen:  # the same photo twice, e.g. UTKFace/ and crop_part1/ of the real download
            duplicates.append((path, seen[path.name]))
            continue
        seen[path.name] = path
        paths.append(path)
        ages.append(age)
    if skipped:
        warnings.warn(f"{root}: skipped {skipped} images whose name is not age_gender_race_datetime.jpg")
    if duplicates:
        again, first = duplicates[0]
        warnings.warn(f"{root}: {len(duplicates)} file names occur more than once in its subfolders (e.g. {again} "
                      f"and {first}); kept the first of each (sorted path order), so that one photo cannot land in "
                      f"both train and test. Point --root at one folder (e.g. UTKFace/) to silence this.")
    return _face_split(paths, np.asarray(ages, dtype=np.float32), {"name": "utkface", "root": str(root)}, **kwargs)


def _face_split(paths: list[Path], ages: np.ndarray, info: dict, seed: int = 0, image_size: int = 64,
                train_fraction: float = 0.7, limit: int | None = None, check_files: bool = True) -> AgeSplit:
    if len(paths) == 0:
        raise ValueError(f"{info['name']}: no usable samples found")
    if check_files:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{info['name']}: {len(missing)} of {len(paths)} listed images are missing, "
                                    f"e.g. {missing[0]}")
    if limit is not None and limit < len(paths):  # a random subset, reproducible
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
        paths, ages = [paths[i] for i in keep], ages[keep]
    train, test = split_indices(len(paths), train_fraction, seed)
    make = lambda idx: FaceAgeDataset([paths[i] for i in idx], ages[idx], image_size)
    info = {**info, "stand_in": False, "description": f"{info['name']} face images, age in years",
            "age_unit": "years", "image_size": image_size}
    return AgeSplit(make(train), make(test), ages[train], ages[test], in_channels=3, info=info)
