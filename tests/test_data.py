import pytest

from qbench import data
from qbench.data import DataUnavailable


def test_wikitext2_rows_match_hub_layout(data_dir):
    rows = data.wikitext2_rows("test", data_dir)
    assert len(rows) == 4358  # the hub dataset's test rows (MANIFEST.md)
    assert sum(1 for r in rows if r) == 2891
    assert all(r == "" or r.endswith("\n") for r in rows)
    assert rows[1] == " = Robert Boulter = \n"


def test_c4_eval_and_calibration_documents_never_overlap(data_dir):
    eval_docs = data.c4_documents("eval", data_dir)
    calib_docs = data.c4_documents("calib", data_dir)
    assert len(eval_docs) == 1100 and len(calib_docs) == 900
    assert not set(eval_docs) & set(calib_docs)


def test_missing_data_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as err:
        data.wikitext2_rows("test", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "hub" in message and "\n" not in message


def test_data_root_from_environment(monkeypatch, tmp_path):
    from qbench.paths import data_root

    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    assert data_root(None) == tmp_path
    assert data_root("/elsewhere") == data_root("/elsewhere")  # the config value wins
