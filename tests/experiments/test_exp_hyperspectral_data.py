"""Default hyperspectral scene: shapes, simplex, SNR, determinism; the paper's pickle loader."""
import pickle

import numpy as np
import pytest

from experiments.hyperspectral.data import (MATERIALS, generate_scene, load_paper_pickle, load_spectra,
                                            save_paper_pickle, snr_db, split_indices)


@pytest.fixture(scope="module")
def small_scene():
    return generate_scene(seed=3, height=24, width=20)


def test_shipped_spectra_file():
    library = load_spectra()
    assert library["spectra"].shape[1] == 144
    assert library["wavelengths_nm"][0] == pytest.approx(400.0) and library["wavelengths_nm"][-1] == pytest.approx(1050.0)
    assert list(library["class_names"]) == list(MATERIALS)
    counts = np.bincount(library["class_index"], minlength=4)
    assert np.all(counts >= 3), counts  # several real spectra per class: within-class variability
    assert np.all(library["spectra"] >= 0) and np.all(library["spectra"] <= 1.2)
    assert "PROSAIL" in str(library["source"])


def test_scene_shapes_and_labels(small_scene):
    n = 24 * 20
    assert small_scene.pixels.shape == (n, 144)
    assert small_scene.abundances.shape == (n, 4)
    assert small_scene.sources.shape == (n, 4, 144)
    assert small_scene.noise.shape == (n, 144)
    np.testing.assert_array_equal(small_scene.labels, small_scene.abundances.argmax(axis=1))


def test_abundances_on_simplex(small_scene):
    a = small_scene.abundances
    assert a.min() >= 0.0
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    assert 0.05 < np.mean(a.max(axis=1) > 0.9) < 0.9  # both nearly pure and mixed pixels


def test_elmm_and_snr(small_scene):
    s = small_scene
    clean = np.einsum("npl,np->nl", s.sources.astype(np.float64), s.abundances.astype(np.float64))
    np.testing.assert_allclose(s.pixels, clean + s.noise, atol=1e-5)
    assert snr_db(clean, s.noise) == pytest.approx(30.0, abs=0.05)
    other = generate_scene(seed=3, height=24, width=20, snr_db=20.0)
    other_clean = other.pixels - other.noise
    assert snr_db(other_clean, other.noise) == pytest.approx(20.0, abs=0.05)


def test_spatial_structure(small_scene):
    # Neighbouring pixels' abundances are much closer than random pairs' (smooth fields).
    a = small_scene.abundances.reshape(24, 20, 4)
    neighbours = np.abs(a[:, 1:] - a[:, :-1]).mean()
    shuffled = np.random.default_rng(0).permutation(a.reshape(-1, 4))
    assert neighbours < 0.5 * np.abs(shuffled[1:] - shuffled[:-1]).mean()


def test_deterministic_given_seed():
    a, b = generate_scene(seed=1, height=8, width=8), generate_scene(seed=1, height=8, width=8)
    c = generate_scene(seed=2, height=8, width=8)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.abundances, b.abundances)
    assert not np.array_equal(a.pixels, c.pixels)


def test_default_split_sizes():
    train, test = split_indices(13440, 0.7, seed=0)
    assert (len(train), len(test)) == (9408, 4032)
    assert len(np.intersect1d(train, test)) == 0
    with pytest.raises(ValueError):
        split_indices(10, 1.5)


def test_bad_scene_arguments():
    with pytest.raises(ValueError):
        generate_scene(height=0)


def test_pickle_roundtrip(tmp_path, small_scene):
    path = tmp_path / "scene.pkl"
    save_paper_pickle(small_scene, path)
    with open(path, "rb") as handle:
        raw = pickle.load(handle)
    assert len(raw) == 10 and raw[0].shape == (144, 480) and raw[5].shape == (4, 480)  # X: L x N, A: P x N
    assert raw[6:] == [24, 20, 144, 4]
    loaded = load_paper_pickle(path)
    np.testing.assert_array_equal(loaded.pixels, small_scene.pixels)
    np.testing.assert_array_equal(loaded.abundances, small_scene.abundances)
    np.testing.assert_array_equal(loaded.labels, small_scene.labels)
    assert loaded.info["stored_label_agreement"] == 1.0


def test_pickle_written_by_hand(tmp_path):
    # A file in the paper's layout written without our helper: [X, E, y, S, y, A, m, n, L, P].
    rng = np.random.default_rng(0)
    m, n, bands, materials = 3, 4, 144, 4
    abundances = rng.dirichlet(np.ones(materials), size=m * n).T  # P x N
    pixels = rng.uniform(size=(bands, m * n))                      # L x N
    labels = abundances.argmax(axis=0)
    with open(tmp_path / "paper.pkl", "wb") as handle:
        pickle.dump([pixels, np.zeros_like(pixels), labels, None, labels, abundances, m, n, bands, materials], handle)
    scene = load_paper_pickle(tmp_path / "paper.pkl")
    assert scene.pixels.shape == (12, 144) and scene.abundances.shape == (12, 4)
    np.testing.assert_array_equal(scene.labels, labels)


def test_pickle_warns_when_stored_labels_disagree(tmp_path, recwarn):
    rng = np.random.default_rng(0)
    m, n, bands, materials = 3, 4, 144, 4
    abundances = rng.dirichlet(np.ones(materials), size=m * n).T
    pixels = rng.uniform(size=(bands, m * n))
    labels = abundances.argmax(axis=0)

    def load(stored):
        with open(tmp_path / "labels.pkl", "wb") as handle:
            pickle.dump([pixels, None, stored, None, stored, abundances, m, n, bands, materials], handle)
        return load_paper_pickle(tmp_path / "labels.pkl")

    assert load(labels).info["stored_label_agreement"] == 1.0 and not recwarn.list
    with pytest.warns(UserWarning, match="agree with argmax A for 0.0%"):
        assert load(labels + 1).info["stored_label_agreement"] == 0.0  # stored 1-based
    with pytest.warns(UserWarning, match="48 entries for 12 pixels"):
        assert load(np.eye(materials)[labels]).info["stored_label_agreement"] is None  # one-hot


def test_pickle_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_paper_pickle(tmp_path / "missing.pkl")
    with open(tmp_path / "short.pkl", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(ValueError, match="expected a pickled list"):
        load_paper_pickle(tmp_path / "short.pkl")
    bad = [np.zeros((144, 6)), None, None, None, None, np.full((4, 6), 0.5), 2, 3, 144, 4]  # sums to 2
    with open(tmp_path / "bad.pkl", "wb") as handle:
        pickle.dump(bad, handle)
    with pytest.raises(ValueError, match="simplex"):
        load_paper_pickle(tmp_path / "bad.pkl")
    wrong_shape = [np.zeros((10, 6)), None, None, None, None, np.full((4, 6), 0.25), 2, 3, 144, 4]
    with open(tmp_path / "shape.pkl", "wb") as handle:
        pickle.dump(wrong_shape, handle)
    with pytest.raises(ValueError, match="X has shape"):
        load_paper_pickle(tmp_path / "shape.pkl")
