"""Local data read through `datasets` (JSON Lines and CSV as other tools read them, offline)
and the evaluation split carved out of a single train file by a per-record hash."""

import json
import re
import socket

import pytest

from gmtext.data import CARVE_HASH, DataError, in_carved_eval, is_dev, load_configured, load_split

NAMES = ["negative", "positive"]
TINY = ["model=tiny_llama", "logger=none", "progress=false", "threads=1"]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path.parent


def records(n, start=0):
    return [{"text": f"record number {i} of the single file", "label": i % 2} for i in range(start, start + n)]


# ----------------------------------------------------------------------------- formats
def test_csv_quoted_multiline_field_keeps_its_newline(tmp_path):
    (tmp_path / "train.csv").write_text(
        'text,label\n"line one\nline two",negative\n"a, b",1\n007,0\nNA,positive\n', encoding="utf-8"
    )
    split = load_split("train", NAMES, path=str(tmp_path))
    # values stay strings as written: "007" and "NA" are texts, not a number and a missing value
    assert [(e.text, e.label) for e in split.examples] == [
        ("line one\nline two", 0),
        ("a, b", 1),
        ("007", 0),
        ("NA", 1),
    ]


def test_jsonl_record_with_u2028_loads(tmp_path):
    d = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "first\u2028second", "label": 0}, {"text": "plain", "label": 1}]
    )
    assert "\u2028" in (d / "train.jsonl").read_text(
        encoding="utf-8"
    )  # raw, not escaped: a line separator to str.splitlines
    split = load_split("train", NAMES, path=str(d))
    assert [(e.text, e.label) for e in split.examples] == [("first\u2028second", 0), ("plain", 1)]


def test_local_files_load_without_any_network(tmp_path, monkeypatch):
    attempts = []

    def record(*a, **k):  # datasets swallows a failed ping: record attempts, then assert there were none
        attempts.append(a[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", record)
    monkeypatch.setattr(socket.socket, "connect", record)
    d = write_jsonl(tmp_path / "j" / "train.jsonl", records(4))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text("text,label\nab,0\ncd,1\n", encoding="utf-8")
    assert len(load_split("train", NAMES, path=str(d)).examples) == 4
    assert len(load_split("train", NAMES, path=str(tmp_path / "c")).examples) == 2
    assert attempts == []


def test_a_rewritten_file_is_read_again(tmp_path):
    d = write_jsonl(tmp_path / "train.jsonl", [{"text": "aaaa", "label": 0}, {"text": "bbbb", "label": 1}])
    assert [e.text for e in load_split("train", NAMES, path=str(d)).examples] == ["aaaa", "bbbb"]
    write_jsonl(tmp_path / "train.jsonl", [{"text": "cccc", "label": 0}, {"text": "dddd", "label": 1}])  # same size
    assert [e.text for e in load_split("train", NAMES, path=str(d)).examples] == ["cccc", "dddd"]


def test_mixed_label_types_and_float_ids(tmp_path):
    d = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": "a", "label": "negative"}, {"text": "b", "label": 1}, {"text": "c", "label": 0.0}],
    )
    assert [e.label for e in load_split("train", NAMES, path=str(d)).examples] == [0, 1, 0]
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match=r"row 1: label 1.5 outside the declared labels"):
        load_split("train", NAMES, path=str(d))


def test_invalid_csv_and_non_object_json_lines_are_one_line_errors(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"never closed,0\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv: invalid CSV \(.*EOF inside string"):
        load_split("train", NAMES, path=str(tmp_path))
    d = tmp_path / "j"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "a", "label": 0}\n["a", 1]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.jsonl:2: not a JSON object"):
        load_split("train", NAMES, path=str(d))


# ----------------------------------------------------------------------------- carve
def carve_cfg(compose, d, fraction=0.25, *extra, config_name="release"):
    return compose(
        [*TINY, f"dataset.path={d}", f"dataset.carve.eval_fraction={fraction}", *extra], config_name=config_name
    )


def test_carve_splits_one_file_by_each_records_own_hash(compose, tmp_path):
    rows = records(200)
    d = write_jsonl(tmp_path / "a" / "train.jsonl", rows)
    ds = carve_cfg(compose, d).dataset
    ev, tr = load_configured(ds, "validation"), load_configured(ds, "train")
    texts = [r["text"] for r in rows]
    assert [e.text for e in ev.examples] == [t for t in texts if in_carved_eval(t, 0.25)]
    assert [e.text for e in tr.examples] == [t for t in texts if not in_carved_eval(t, 0.25)]
    assert 30 <= len(ev.examples) <= 70  # ~50 expected
    # each record's side depends on itself alone: other records added, one removed, the file reversed
    other = list(reversed(rows[1:])) + records(50, start=1000)
    d2 = write_jsonl(tmp_path / "b" / "train.jsonl", other)
    ev2 = {e.text for e in load_configured(carve_cfg(compose, d2).dataset, "validation").examples}
    assert {e.text for e in ev.examples} - {texts[0]} == ev2 & set(texts)
    # independent of the dev bucket, which is taken from what the carve leaves
    assert any(is_dev(e.text) for e in ev.examples) and any(is_dev(e.text) for e in tr.examples)


def test_carved_eval_records_never_enter_the_release(compose, tmp_path, monkeypatch):
    import gmtext.runtime as R
    from gmtext.stages.release import run_release

    rows = records(80)
    d = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    carved = {r["text"] for r in rows if in_carved_eval(r["text"], 0.3)}
    assert carved
    seen = []

    def spy(*a, **k):
        out = R.select_real_examples.__wrapped__(*a, **k)
        seen.append(out)
        return out

    spy.__wrapped__ = R.select_real_examples
    monkeypatch.setattr(R, "select_real_examples", spy)
    cfg = carve_cfg(compose, d, 0.3)
    run_release(cfg, tmp_path / "run")
    ((texts, num_rows),) = seen
    released = {t for per_class in texts for t in per_class}
    assert released and not released & carved
    assert num_rows == len(rows) - len(carved)  # the protected split is what the carve leaves
    entry = json.loads((tmp_path / "run" / "release" / "privacy.json").read_text())["ledger"]["entries"][0]
    assert "carved into the evaluation split (sha256 < 0.3) never enter" in entry["records"]
    # the seeded per-class sample of non-private runs draws from the same carved train split
    texts, _ = R.select_real_examples(carve_cfg(compose, d, 0.3).dataset, 2, 40, 0)
    assert not {t for per_class in texts for t in per_class} & carved


def test_finetune_metrics_record_the_carve_without_the_private_train_count(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    rows = records(60)
    d = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    n_eval = sum(in_carved_eval(r["text"], 0.3) for r in rows)
    m = run_finetune(carve_cfg(compose, d, 0.3, "train=none", config_name="finetune"), tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert (
        saved["carve"]
        == m["carve"]
        == {
            "eval_fraction": 0.3,
            "hash": CARVE_HASH,
            "from_split": "train",
            "n_eval": n_eval,
            "n_train": "withheld (private: the train split's size)",
        }
    )
    assert saved["n_eval"] == n_eval and saved["splits"]["accuracy"] == "train[carved eval]"
    # the private count appears nowhere as a number of its own (digits inside a float such as
    # 0.0905435..., a hash or a path like pytest-35/ are no leak: a substring check failed on one)
    count = len(rows) - n_eval
    dumped = json.dumps({k: v for k, v in saved.items() if k != "config"})
    assert not re.search(rf"(?<![\w.\-/]){count}(?![\w.])", dumped)


def test_carve_refusals_name_the_value_and_what_is_accepted(compose, tmp_path):
    d = write_jsonl(tmp_path / "data" / "train.jsonl", records(40))
    with pytest.raises(
        DataError,
        match=r"split 'validation' not found in .*found: \['train'\]\); to carve evaluation "
        r"records out of one file set dataset.carve.eval_fraction",
    ):
        load_configured(carve_cfg(compose, d, 0).dataset, "validation")
    for bad in (1.0, -0.1):
        with pytest.raises(DataError, match=rf"dataset.carve.eval_fraction={bad}: must be in \[0, 1\)"):
            load_configured(carve_cfg(compose, d, bad).dataset, "train")
    with pytest.raises(DataError, match=r"eval_split and dataset.train_split are both 'train'"):
        load_configured(carve_cfg(compose, d, 0.2, "dataset.eval_split=train").dataset, "train")
    write_jsonl(d / "validation.jsonl", records(4))
    with pytest.raises(
        DataError,
        match=rf"dataset.carve.eval_fraction=0.2: {d / 'validation.jsonl'} exists, and carving "
        r"would leave it unread; set dataset.carve.eval_fraction=0 to evaluate on it",
    ):
        load_configured(carve_cfg(compose, d, 0.2).dataset, "train")
    assert len(load_configured(carve_cfg(compose, d, 0).dataset, "validation").examples) == 4  # off: the file is read
