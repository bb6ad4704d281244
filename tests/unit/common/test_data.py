import numpy as np
import pytest

from common.data import (
    Dataset,
    Examples,
    Standardizer,
    load_builtin,
    load_site_file,
    split_holdout_stratified,
    split_indices,
    split_train_test,
)
from common.errors import DataError


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_load_site_file_csv_ok(tmp_path):
    p = _write_csv(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,4.5,1\n")
    d = load_site_file(p, num_classes=2)
    assert d.x.tolist() == [[1.0, 2.0], [3.0, 4.5]] and d.y.tolist() == [0, 1]


def test_load_site_file_npz_ok(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((4, 3)), y=np.array([0, 1, 2, 1]))
    d = load_site_file(p, num_classes=3)
    assert d.x.shape == (4, 3) and d.num_classes == 3


def test_load_site_file_missing_file_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_site_file(tmp_path / "nope.csv", num_classes=2)


def test_load_site_file_missing_label_column_clear_error(tmp_path):
    p = _write_csv(tmp_path / "d.csv", "a,b,target\n1,2,0\n")
    with pytest.raises(DataError, match="no label column 'label'"):
        load_site_file(p, num_classes=2)


def test_load_site_file_non_numeric_value_names_line(tmp_path):
    p = _write_csv(tmp_path / "d.csv", "a,label\n1,0\nabc,1\n")
    with pytest.raises(DataError, match=r"d.csv:3: non-numeric value 'abc'"):
        load_site_file(p, num_classes=2)


def test_load_site_file_empty_data_clear_error(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load_site_file(_write_csv(tmp_path / "d.csv", "a,label\n"), num_classes=2)
    with pytest.raises(DataError, match="empty file"):
        load_site_file(_write_csv(tmp_path / "e.csv", ""), num_classes=2)


def test_load_site_file_nan_rejected(tmp_path):
    with pytest.raises(DataError, match="NaN"):
        load_site_file(_write_csv(tmp_path / "d.csv", "a,label\nnan,0\n"), num_classes=2)


def test_load_site_file_label_out_of_range_rejected(tmp_path):
    with pytest.raises(DataError, match="labels must lie"):
        load_site_file(_write_csv(tmp_path / "d.csv", "a,label\n1,5\n"), num_classes=2)


def test_load_site_file_fractional_label_rejected(tmp_path):
    with pytest.raises(DataError, match="integers"):
        load_site_file(_write_csv(tmp_path / "d.csv", "a,label\n1,0.5\n"), num_classes=2)


def test_load_site_file_ragged_row_rejected(tmp_path):
    with pytest.raises(DataError, match="expected 2 values"):
        load_site_file(_write_csv(tmp_path / "d.csv", "a,label\n1,0,7\n"), num_classes=2)


def test_load_site_file_unsupported_suffix_rejected(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        load_site_file(p, num_classes=2)


def test_load_site_file_corrupt_npz_rejected(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError):
        load_site_file(p, num_classes=2)


def test_standardizer_uses_only_given_data():
    x = np.array([[0.0, 10.0], [2.0, 10.0]], np.float32)
    s = Standardizer.fit(x)
    out = s.transform(x)
    assert np.allclose(out[:, 0], [-1, 1]) and np.all(np.isfinite(out))


@pytest.mark.parametrize("name,classes", [("digits", 10), ("breast_cancer", 2)])
def test_builtin_holdout_stratified_disjoint(name, classes):
    data = load_builtin(name)
    pool, hold = split_holdout_stratified(data, 0.2, seed=0)
    assert len(pool) + len(hold) == len(data)
    assert set(np.unique(hold.y)) == set(range(classes))


def test_standardizer_chunked_fit_agrees_with_a_float64_reference():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 17, size=(1000, 5)).astype(np.uint8)
    index = np.sort(rng.choice(1000, size=700, replace=False))
    s = Standardizer.fit(x, index=index, chunk_rows=64)  # 11 chunks combined
    ref = x[index].astype(np.float64)
    np.testing.assert_allclose(s.mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.scale, ref.std(0), rtol=1e-5)


def test_standardizer_single_chunk_fit_is_the_plain_float32_moments():
    x = load_builtin("digits").x[:300]
    s = Standardizer.fit(x)
    np.testing.assert_array_equal(s.mean, x.mean(axis=0))
    np.testing.assert_array_equal(s.scale, np.maximum(x.std(axis=0), 1e-6))


def test_examples_batches_equal_the_scaled_rows():
    data = load_builtin("digits")
    index = np.arange(0, len(data), 3)
    scaler = Standardizer.fit(data.x, index=index)
    ex = Examples(data, index, scaler, (1, 8, 8))
    xb, yb = ex.take(np.array([5, 0, 7]))
    expected = scaler.transform(data.x[index[[5, 0, 7]]]).reshape(3, 1, 8, 8)
    np.testing.assert_array_equal(xb, expected)
    np.testing.assert_array_equal(yb, data.y[index[[5, 0, 7]]])
    np.testing.assert_array_equal(
        ex.features(), scaler.transform(data.x[index]).reshape(-1, 1, 8, 8)
    )
    empty_x, empty_y = ex.take(np.array([], dtype=np.int64))
    assert empty_x.shape == (0, 1, 8, 8) and empty_y.shape == (0,)


def test_examples_shape_that_does_not_fit_the_features_raises():
    data = load_builtin("digits")
    with pytest.raises(DataError, match="cannot take the shape"):
        Examples(data, np.arange(3), Standardizer.fit(data.x), (1, 7, 7))


def test_split_indices_match_split_train_test():
    data = load_builtin("breast_cancer")
    train_idx, test_idx = split_indices(len(data), 0.2, np.random.default_rng(9))
    train, test = split_train_test(data, 0.2, np.random.default_rng(9))
    np.testing.assert_array_equal(data.x[train_idx], train.x)
    np.testing.assert_array_equal(data.y[test_idx], test.y)
    assert len(np.intersect1d(train_idx, test_idx)) == 0


def test_load_site_file_integer_csv_kept_in_one_byte(tmp_path):
    p = _write_csv(tmp_path / "d.csv", "a,b,label\n0,16,0\n3,4,1\n")
    d = load_site_file(p, num_classes=2)
    assert d.x.dtype == np.uint8 and d.x.tolist() == [[0, 16], [3, 4]]


def test_dataset_float64_features_refused():
    with pytest.raises(DataError, match="float32 or a compact"):
        Dataset(np.zeros((2, 2)), np.zeros(2, np.int64), 2, "d")
