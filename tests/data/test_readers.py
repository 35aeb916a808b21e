"""read_records: every supported file kind, and a DataError naming file:line for bad data."""

import gzip
import json

import pytest

from tunelab.data.readers import read_records
from tunelab.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_records_remember_their_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    records = read_records(path)
    assert [(r.fields["text"], r.line) for r in records] == [("a", 1), ("b", 4)]
    assert records[1].where == f"{path}:4"


def test_jsonl_with_bom_and_crlf_line_endings(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r.fields["text"] for r in read_records(path)] == ["a", "b"]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write('{"text": "a"}\n{"text": "b"}\n')
    assert [r.line for r in read_records(path)] == [1, 2]


def test_json_array_records_get_the_line_where_each_object_starts(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2), encoding="utf-8")
    records = read_records(path)
    assert [r.fields["text"] for r in records] == ["a", "b"]
    assert [r.line for r in records] == [2, 5]  # "[" is line 1; each object spans 3 lines


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r.line for r in read_records(path)] == [1, 2]


def test_malformed_json_array_names_the_line_of_the_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert f"{path}:4" in str(error.value)


def test_csv_line_is_where_the_row_starts_counting_the_header_as_line_1(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",pos\nplain,neg\n', encoding="utf-8")
    records = read_records(path)
    assert [r.fields for r in records] == [
        {"text": "two\nlines", "label": "pos"},
        {"text": "plain", "label": "neg"},
    ]
    assert [r.line for r in records] == [2, 4]


def test_tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("prompt\tcompletion\nhi, there\thello\n", encoding="utf-8")
    assert read_records(path)[0].fields == {"prompt": "hi, there", "completion": "hello"}


def test_csv_ragged_row_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,pos\nbad,neg,extra\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert f"{path}:3" in str(error.value)
    assert "3 columns but the header has 2" in str(error.value)


def test_parquet_rows_are_numbered_from_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    records = read_records(path)
    assert [(r.fields, r.line) for r in records] == [
        ({"text": "a", "label": 0}, 1),
        ({"text": "b", "label": 1}, 2),
    ]


def test_saved_dataset_folder_and_dataset_dict_splits(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(single))
    assert [(r.fields["text"], r.line) for r in read_records(single)] == [("a", 1), ("b", 2)]

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
            "test": datasets.Dataset.from_dict({"text": ["v1"]}),
        }
    ).save_to_disk(str(splits))
    assert [r.fields["text"] for r in read_records(splits)] == ["t1", "t2"]  # train by default
    assert [r.fields["text"] for r in read_records(f"{splits}::test")] == ["v1"]
    with pytest.raises(DataError) as error:
        read_records(f"{splits}::validation")
    assert "no split 'validation'" in str(error.value) and "test" in str(error.value)


def test_hub_dataset_offline_says_the_hub_is_unreachable_and_how_to_fix_it(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline mode fails at once instead of retrying the network for ~20 seconds
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        read_records("hf://someone/some-dataset::train")
    message = str(error.value)
    assert "hf://someone/some-dataset::train" in message
    assert "unreachable" in message and "save_to_disk" in message


def test_bad_json_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    message = str(error.value)
    assert f"{path}:2" in message and "column" in message


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert f"{path}:2" in str(error.value) and "array, not an object" in str(error.value)


def test_non_utf8_bytes_name_line_and_byte_offset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as error:
        read_records(path)
    message = str(error.value)
    assert f"{path}:2" in message
    assert "byte offset 13 of line 2" in message and "UTF-8" in error.value.fix


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(path) in str(error.value) and "no records" in str(error.value)


def test_csv_with_header_only_is_empty(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        read_records(path)


def test_missing_file_suggests_a_similar_name(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(tmp_path / "trian.jsonl")
    assert str(tmp_path / "trian.jsonl") in str(error.value)
    assert "did you mean" in error.value.fix and "train.jsonl" in error.value.fix


def test_unknown_extension_lists_supported_kinds(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert ".xlsx" in str(error.value) and ".jsonl" in error.value.fix
    assert ".parquet" in error.value.fix


def test_100k_line_jsonl_is_parsed_in_one_pass(tmp_path, monkeypatch):
    """Work, not time: each line goes to the JSON parser once, on its own, so the characters
    parsed add up to the file's; re-parsing the rest of the file per record (a quadratic
    regression) would hand the parser ~n²/2 lines."""
    lines = [json.dumps({"prompt": f"Review {i}: a fine film with a plot\nSentiment:",
                         "completion": " p"}) for i in range(100_000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed_chars = []
    real_loads = json.loads

    def counting_loads(text, *args, **kwargs):
        parsed_chars.append(len(text))
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting_loads)
    records = read_records(path)
    assert len(parsed_chars) == 100_000 and sum(parsed_chars) == sum(map(len, lines))
    assert len(records) == 100_000 and records[-1].line == 100_000
    assert records[54_321].fields["prompt"].startswith("Review 54321:")
    assert records[54_321].line == 54_322
