"""Hyperspectral data: the default synthetic Houston-like scene, and the paper's pickle.

Default scene (``houston-like``): a 112 x 120 image (13440 pixels) of P = 4 materials
(vegetation, red metal roofs, concrete, asphalt), 144 bands over 400-1050 nm, generated with the
extended linear mixing model (ELMM)

    x_n = sum_p psi_np * s_np * a_np + e_n

- s_np: the spectrum of material p at pixel n, a random convex combination of two spectra of that class
  from the shipped earthlib library (measured, except vegetation: PROSAIL simulations), so every pixel
  sees its own version of each material (within-class variability);
- psi_np: a positive per-pixel, per-material scaling (illumination, slope), a smooth random field
  around 1;
- a_n: abundances on the simplex with spatial structure, a softmax of smooth Gaussian random fields;
- e_n: white Gaussian noise at 30 dB SNR (over the whole image).
The coarse label is argmax_p a_np. Everything is a deterministic function of the seed.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

SPECTRA_FILE = Path(__file__).resolve().parent / "spectra" / "earthlib_urban_144.npz"
MATERIALS = ("vegetation", "red_metal_roof", "concrete", "asphalt")


@dataclass
class Scene:
    """Pixels as rows: X (N, L), abundances (N, P), labels (N,); plus the generation's by-products."""

    pixels: np.ndarray
    abundances: np.ndarray
    labels: np.ndarray
    height: int
    width: int
    material_names: tuple[str, ...]
    wavelengths_nm: np.ndarray | None = None
    noise: np.ndarray | None = None
    sources: np.ndarray | None = None  # (N, P, L) per-pixel endmembers (psi included)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n, p = self.abundances.shape
        if self.pixels.shape[0] != n or self.labels.shape != (n,):
            raise ValueError(f"inconsistent scene: pixels {self.pixels.shape}, abundances {self.abundances.shape}, "
                             f"labels {self.labels.shape}")
        if len(self.material_names) != p:
            raise ValueError(f"{len(self.material_names)} material names for {p} abundance columns")


def load_spectra(path: Path = SPECTRA_FILE) -> dict[str, np.ndarray]:
    """The shipped endmember library (see spectra/README.md); plain numpy, no earthlib needed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"spectra file {path} not found; regenerate it with "
                                "experiments/hyperspectral/extract_spectra.py")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _smooth_fields(rng: np.random.Generator, count: int, height: int, width: int, sigma: float) -> np.ndarray:
    """``count`` Gaussian random fields with unit standard deviation (periodic boundary)."""
    fields = np.stack([gaussian_filter(rng.standard_normal((height, width)), sigma, mode="wrap")
                       for _ in range(count)])
    return fields / fields.std(axis=(1, 2), keepdims=True)


def generate_scene(
    seed: int = 0,
    height: int = 112,
    width: int = 120,
    snr_db: float = 30.0,
    smoothness: float = 4.0,
    sharpness: float = 2.5,
    scaling_std: float = 0.1,
    spectra_path: Path = SPECTRA_FILE,
) -> Scene:
    """Generate the default ELMM scene (see the module docstring).

    ``smoothness``: spatial correlation length of the abundance fields in pixels; ``sharpness``:
    softmax gain of those fields (2.5 makes about a quarter of the pixels nearly pure, max abundance
    > 0.9, and the rest mixed); ``scaling_std``: standard deviation of psi around 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height} x {width}")
    if not np.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    library = load_spectra(spectra_path)
    spectra, class_index = library["spectra"].astype(np.float64), library["class_index"]
    n_materials = len(MATERIALS)
    rng = np.random.default_rng(seed)
    n_pixels = height * width

    logits = sharpness * _smooth_fields(rng, n_materials, height, width, smoothness)
    logits -= logits.max(axis=0, keepdims=True)
    abundances = np.exp(logits)
    abundances /= abundances.sum(axis=0, keepdims=True)
    abundances = abundances.reshape(n_materials, n_pixels).T  # (N, P)

    # psi: smooth, positive, around 1 (clipped so no material is switched off or blown up).
    psi = 1.0 + scaling_std * _smooth_fields(rng, n_materials, height, width, smoothness / 2)
    psi = np.clip(psi, 0.5, 1.5).reshape(n_materials, n_pixels).T  # (N, P)

    sources = np.empty((n_pixels, n_materials, spectra.shape[1]))
    for p in range(n_materials):
        members = np.flatnonzero(class_index == p)
        if members.size == 0:
            raise ValueError(f"spectra file has no spectrum of class {p} ({MATERIALS[p]})")
        first, second = rng.choice(members, size=(2, n_pixels))
        weight = rng.uniform(size=(n_pixels, 1))
        sources[:, p] = weight * spectra[first] + (1.0 - weight) * spectra[second]
    sources *= psi[:, :, None]

    clean = np.einsum("npl,np->nl", sources, abundances)
    noise_std = np.sqrt(np.mean(clean ** 2) / 10.0 ** (snr_db / 10.0))
    noise = rng.normal(scale=noise_std, size=clean.shape)
    pixels = clean + noise
    return Scene(
        pixels=pixels.astype(np.float32),
        abundances=abundances.astype(np.float32),
        labels=abundances.argmax(axis=1).astype(np.int64),
        height=height,
        width=width,
        material_names=MATERIALS,
        wavelengths_nm=library["wavelengths_nm"],
        noise=noise.astype(np.float32),
        sources=sources.astype(np.float32),
        info={"name": "houston-like", "seed": seed, "snr_db": snr_db, "smoothness": smoothness,
              "sharpness": sharpness, "scaling_std": scaling_std,
              "spectra": str(library["source"])},
    )


def snr_db(clean: np.ndarray, noise: np.ndarray) -> float:
    """10 log10(signal power / noise power) over the whole image."""
    return float(10.0 * np.log10(np.sum(np.asarray(clean, np.float64) ** 2) / np.sum(np.asarray(noise, np.float64) ** 2)))


# --- the paper's pickle ----------------------------------------------------------------------------
# The paper's data file is a pickled list [X, E, y, S, y, A, m, n, L, P]: X (L x N) pixels, E noise,
# y argmax labels (stored twice), S per-pixel sources, A (P x N) abundances, an m x n image of N = m*n
# pixels, L bands, P materials.
PICKLE_FIELDS = ("X", "E", "y", "S", "y2", "A", "m", "n", "L", "P")


def save_paper_pickle(scene: Scene, path: Path) -> None:
    """Write ``scene`` in the paper's pickle layout (used by the tests and to export the default scene)."""
    n_pixels, n_materials = scene.abundances.shape
    sources = scene.sources.transpose(2, 1, 0) if scene.sources is not None else None  # (L, P, N)
    noise = scene.noise.T if scene.noise is not None else None
    payload = [scene.pixels.T, noise, scene.labels, sources, scene.labels, scene.abundances.T,
               scene.height, scene.width, scene.pixels.shape[1], n_materials]
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def load_paper_pickle(path: Path) -> Scene:
    """Read the paper's pickle ``[X, E, y, S, y, A, m, n, L, P]``.

    Only X, A, m, n, L and P are required to be meaningful; the labels are recomputed as argmax A
    (the definition of the coarse task); their agreement with the stored y is recorded, with a warning
    below 99% (or when y does not hold one label per pixel).
    Note: unpickling runs code from the file; only load files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hyperspectral pickle {path} not found")
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    if not isinstance(payload, (list, tuple)) or len(payload) != len(PICKLE_FIELDS):
        raise ValueError(f"{path}: expected a pickled list [X, E, y, S, y, A, m, n, L, P] of "
                         f"{len(PICKLE_FIELDS)} items, got {type(payload).__name__} of length "
                         f"{len(payload) if hasattr(payload, '__len__') else '?'}")
    items = dict(zip(PICKLE_FIELDS, payload))
    n_bands, n_materials = int(items["L"]), int(items["P"])
    height, width = int(items["m"]), int(items["n"])
    pixels = np.asarray(items["X"], dtype=np.float32)
    abundances = np.asarray(items["A"], dtype=np.float32)
    n_pixels = height * width
    # The paper stores bands x pixels; accept the transposed layout too, recognised by L and P.
    if pixels.shape == (n_bands, n_pixels):
        pixels = pixels.T
    elif pixels.shape != (n_pixels, n_bands):
        raise ValueError(f"{path}: X has shape {pixels.shape}, expected ({n_bands}, {n_pixels}) = (L, m*n)")
    if abundances.shape == (n_materials, n_pixels):
        abundances = abundances.T
    elif abundances.shape != (n_pixels, n_materials):
        raise ValueError(f"{path}: A has shape {abundances.shape}, expected ({n_materials}, {n_pixels}) = (P, m*n)")
    if not (np.all(np.isfinite(pixels)) and np.all(np.isfinite(abundances))):
        raise ValueError(f"{path}: X or A holds non-finite values")
    if abundances.min() < -1e-4 or np.abs(abundances.sum(axis=1) - 1.0).max() > 1e-3:
        raise ValueError(f"{path}: abundances are not on the simplex (min {abundances.min():.3g}, "
                         f"max |sum - 1| {np.abs(abundances.sum(axis=1) - 1.0).max():.3g})")
    labels = abundances.argmax(axis=1).astype(np.int64)
    stored = np.asarray(items["y"]).ravel()
    label_agreement = float(np.mean(stored == labels)) if stored.size == n_pixels else None
    if items["y"] is not None and (label_agreement is None or label_agreement < 0.99):
        found = (f"agree with argmax A for {label_agreement:.1%} of the pixels" if label_agreement is not None
                 else f"have {stored.size} entries for {n_pixels} pixels")
        warnings.warn(f"{path}: the stored labels y {found}; the coarse labels used are argmax A (0-based). "
                      f"Stored 1-based or one-hot labels, or a different pixel order, would show this.")
    return Scene(pixels=pixels, abundances=abundances, labels=labels, height=height, width=width,
                 material_names=tuple(f"material_{p}" for p in range(n_materials)),
                 info={"name": "pickle", "path": str(path), "stored_label_agreement": label_agreement})


def split_indices(n_items: int, train_fraction: float = 0.7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train/test split (70/30 like the paper's 9408/4032 of 13440), deterministic in ``seed``."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = np.random.default_rng(seed).permutation(n_items)
    n_train = int(round(train_fraction * n_items))
    if n_train == 0 or n_train == n_items:
        raise ValueError(f"{n_items} items cannot be split {train_fraction:.0%} / {1 - train_fraction:.0%}")
    return np.sort(order[:n_train]), np.sort(order[n_train:])
