"""Regenerate ``spectra/earthlib_urban_144.npz`` from the earthlib spectral library.

Only this script needs earthlib (``pip install earthlib``); the experiment reads the shipped .npz
with numpy alone. The library's ENVI file is read directly here (a flat little-endian float32 array
described by its ``.hdr``), so no ENVI reader is needed either.

Classes (earthlib names and categories, see ``spectra.csv``):
  vegetation   LEVEL_3 == "canopy"  -- PROSAIL canopy *simulations*, not field measurements;
               a fixed random subset (the library holds 2000 of them)
  red metal    LEVEL_3 == "metal" with reflectance(650 nm) / reflectance(550 nm) > 1.1 (reddish roofs)
  concrete     names starting "rpc" (concrete roads), "spc" (concrete sidewalks/driveways),
               "rbc" (concrete bridges)
  asphalt      names starting "rpa" (asphalt roads)
Spectra (400-2450 nm at 10 nm) are linearly interpolated onto 144 bands evenly spaced over
400-1050 nm, the band count of the Houston scene the paper uses.

Usage:  python experiments/hyperspectral/extract_spectra.py [--out PATH] [--vegetation N]
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import numpy as np

CLASS_NAMES = ("vegetation", "red_metal_roof", "concrete", "asphalt")
N_BANDS = 144
WAVELENGTH_RANGE_NM = (400.0, 1050.0)
RED_RATIO_THRESHOLD = 1.1  # R(650 nm) / R(550 nm) above this: the roof looks red
DEFAULT_OUT = Path(__file__).resolve().parent / "spectra" / "earthlib_urban_144.npz"


def _header_list(header: str, key: str) -> list[str]:
    match = re.search(rf"^{key}\s*=\s*\{{([^}}]*)\}}", header, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"ENVI header has no '{key}' field")
    return [item.strip() for item in match.group(1).split(",")]


def _header_value(header: str, key: str) -> str:
    match = re.search(rf"^{key}\s*=\s*(\S+)", header, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"ENVI header has no '{key}' field")
    return match.group(1)


def read_envi_library(sli_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (spectra (n, bands) float32, wavelengths in nm, names) of an ENVI spectral library."""
    header = Path(str(sli_path) + ".hdr").read_text()
    if _header_value(header, "data type") != "4" or _header_value(header, "byte order") != "0":
        raise ValueError("expected little-endian float32 data (ENVI data type 4, byte order 0)")
    names = _header_list(header, "spectra names")
    wavelengths = np.array(_header_list(header, "wavelength"), dtype=np.float64)
    if _header_value(header, "wavelength units").lower().startswith("micro"):
        wavelengths = wavelengths * 1000.0
    offset = int(_header_value(header, "header offset"))
    data = np.fromfile(sli_path, dtype="<f4", offset=offset)
    return data.reshape(len(names), len(wavelengths)), wavelengths, names


def extract(vegetation_count: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    import earthlib  # only needed here

    data_dir = Path(earthlib.__file__).resolve().parent / "data"
    spectra, wavelengths, names = read_envi_library(data_dir / "spectra.sli")
    with open(data_dir / "spectra.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != len(names):
        raise ValueError(f"spectra.csv has {len(rows)} rows but the library {len(names)} spectra")
    # The csv and the library are in the same order (a few names differ in spelling), so use the index.
    level3 = np.array([row["LEVEL_3"] for row in rows])
    csv_names = np.array([row["NAME"] for row in rows])

    def at(nm: float) -> np.ndarray:
        return spectra[:, int(np.argmin(np.abs(wavelengths - nm)))]

    red_ratio = at(650.0) / np.maximum(at(550.0), 1e-6)
    starts = lambda *prefixes: np.array([n.startswith(prefixes) for n in csv_names])
    masks = {
        "vegetation": level3 == "canopy",
        "red_metal_roof": (level3 == "metal") & (red_ratio > RED_RATIO_THRESHOLD),
        "concrete": starts("rpc", "spc", "rbc"),
        "asphalt": starts("rpa"),
    }
    in_range = (wavelengths >= WAVELENGTH_RANGE_NM[0] - 10) & (wavelengths <= WAVELENGTH_RANGE_NM[1] + 10)
    valid = np.all(np.isfinite(spectra[:, in_range]), axis=1) & (spectra[:, in_range].min(axis=1) >= 0)
    rng = np.random.default_rng(seed)
    target_nm = np.linspace(*WAVELENGTH_RANGE_NM, N_BANDS)
    out_spectra, out_class, out_names = [], [], []
    for class_index, class_name in enumerate(CLASS_NAMES):
        indices = np.flatnonzero(masks[class_name] & valid)
        if class_name == "vegetation" and len(indices) > vegetation_count:
            indices = np.sort(rng.choice(indices, size=vegetation_count, replace=False))
        if len(indices) == 0:
            raise ValueError(f"no spectra found for class {class_name}")
        for i in indices:
            out_spectra.append(np.interp(target_nm, wavelengths, spectra[i]))
            out_class.append(class_index)
            out_names.append(names[i])
    return {
        "spectra": np.asarray(out_spectra, dtype=np.float32),
        "class_index": np.asarray(out_class, dtype=np.int64),
        "class_names": np.asarray(CLASS_NAMES),
        "spectrum_names": np.asarray(out_names),
        "wavelengths_nm": target_nm.astype(np.float32),
        "source": np.asarray(
            f"earthlib {getattr(earthlib, '__version__', '')} (MIT license, Christopher Anderson), "
            "data/spectra.sli; vegetation spectra are PROSAIL simulations"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vegetation", type=int, default=48, help="how many PROSAIL canopy spectra to keep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the vegetation subset")
    args = parser.parse_args()
    arrays = extract(args.vegetation, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["class_index"], minlength=len(CLASS_NAMES))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): "
          + ", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, counts)))


if __name__ == "__main__":
    main()
