import numpy as np
import pytest

from common.data import Standardizer, load_builtin, load_site_file, split_holdout_stratified
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
