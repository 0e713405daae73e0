"""Prompt tables: `read_prompts` reads .csv, .tsv, .json, .jsonl and .parquet as well as .txt, and refuses a bad
table in one line that names the problem and the way out."""

import csv
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wandistiller.cli import build_parser, main
from wandistiller.data import read_prompts

PROMPTS = ['a red fox, sitting in "fresh" snow', "a lighthouse\non a rocky coast", "ramen 🍜 in Tōkyō, at night",
           "1984", "a cat; a dog\tand a bird"]


def _write(path, rows: list[dict]):
    """`rows` in the format of `path`'s extension, each with the csv/json/pyarrow writer a user would use."""
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), dialect="excel-tab" if suffix == ".tsv" else "excel")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


TABLES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@pytest.mark.parametrize("suffix", TABLES)
def test_every_table_format_gives_the_same_prompts(tmp_path, suffix):
    rows = [{"id": i, "prompt": f"  {p} ", "caption": p.upper(), "title": str(1984 + i)} for i, p in enumerate(PROMPTS)]
    path = _write(tmp_path / f"prompts{suffix}", rows)
    assert read_prompts(path) == PROMPTS  # the default column, stripped, cells with , " newline tab kept whole
    assert read_prompts(path, "caption") == [p.upper() for p in PROMPTS]
    assert read_prompts(path, "title") == ["1984", "1985", "1986", "1987", "1988"]  # text, though they look like numbers


def test_a_json_array_of_strings_and_text_files_as_before(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS), encoding="utf-8")
    assert read_prompts(path) == PROMPTS
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\n\na cat\n  a dog  \n", encoding="utf-8")
    assert read_prompts(text) == ["a cat", "a dog"]  # blank lines and comments skipped, as before


def test_a_large_csv_and_parquet(tmp_path):
    prompts = [f"prompt number {i}, with a comma,\na line break and a \"quote\"" for i in range(120_000)]
    rows = [{"prompt": p} for p in prompts]
    assert read_prompts(_write(tmp_path / "big.csv", rows)) == prompts
    assert read_prompts(_write(tmp_path / "big.parquet", rows)) == prompts


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.csv does not exist: pass data_path="):
        read_prompts(tmp_path / "missing.csv")
    other = tmp_path / "prompts.xlsx"
    other.write_text("prompt\na cat\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx': use \.txt .*\.csv, \.tsv, \.json, \.jsonl, \.parquet"):
        read_prompts(other)


@pytest.mark.parametrize("suffix", TABLES)
def test_a_missing_column_names_the_columns_there(tmp_path, suffix):
    path = _write(tmp_path / f"p{suffix}", [{"text": "a cat", "id": 1}])
    with pytest.raises(ValueError, match=r"has no column 'prompt': its columns are 'text', 'id'; .*--prompt_column"):
        read_prompts(path)
    with pytest.raises(ValueError, match=r"has no column 'caption'"):
        read_prompts(path, "caption")


def test_a_column_for_a_text_file_or_an_array_of_strings(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompt_column='caption' names a column, .* is text.*drop --prompt_column"):
        read_prompts(text, "caption")
    array = tmp_path / "p.json"
    array.write_text('["a cat"]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"array of prompts without fields: drop --prompt_column"):
        read_prompts(array, "caption")


@pytest.mark.parametrize("suffix", TABLES)
def test_empty_and_null_prompts_are_refused_with_their_rows(tmp_path, suffix):
    rows = [{"prompt": p} for p in ["a cat", "", "a dog", "   ", "a bird"] + [""] * 6]
    if suffix not in (".csv", ".tsv"):  # CSV has no null: an empty cell is ""
        rows[4] = {"prompt": None}
    path = _write(tmp_path / f"p{suffix}", rows)
    unit = {".csv": "data rows", ".tsv": "data rows", ".jsonl": "lines", ".json": "items", ".parquet": "rows"}[suffix]
    bad = "8 empty or null prompt(s) (data rows 2, 4, 6, 7, 8 and 3 more)" if suffix in (".csv", ".tsv") else \
        f"9 empty or null prompt(s) ({unit} 2, 4, 5, 6, 7 and 4 more)"
    with pytest.raises(ValueError, match=re.escape(bad) + r": remove those .* or fill them in"):
        read_prompts(path)


def test_jsonl_lines_are_counted_in_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "x": 1}\n{"x": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"1 empty or null prompt\(s\) \(line 4\)"):
        read_prompts(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_values_that_are_not_text_are_refused(tmp_path, suffix):
    if suffix == ".parquet":
        path = _write(tmp_path / "p.parquet", [{"prompt": 7}, {"prompt": 8}])
        found = r"2 value\(s\) that are not text \(rows 1, 2; the first is int 7\)"
    else:
        path = _write(tmp_path / f"p{suffix}", [{"prompt": "a cat"}, {"prompt": 42}, {"prompt": ["a", "list"]}])
        found = r"2 value\(s\) that are not text \((lines|items) 2, 3; the first is int 42\)"
    with pytest.raises(ValueError, match=found + r": write every prompt as a string"):
        read_prompts(path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_text_tables_must_be_utf8(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    text = {".csv": 'prompt\n"a cat"\ncafé\n', ".tsv": "prompt\na cat\ncafé\n", ".json": '[\n "a cat",\n "café"\n]',
            ".jsonl": '{"prompt": "a cat"}\n{"prompt": "café"}\n'}[suffix]
    path.write_bytes(text.encode("latin-1"))
    line = 2 if suffix == ".jsonl" else 3
    byte = text.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"is not valid UTF-8 \(byte {byte}, line {line}\): re-save it as UTF-8"):
        read_prompts(path)


MALFORMED = {  # a file's name and text, and what its error must say
    "jsonl: a broken line": ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n{"prompt": "a bird"}\n',
                             r"line 2 is not valid JSON \(.*\): fix that line"),
    "jsonl: a line that is no object": ("p.jsonl", '{"prompt": "a cat"}\n"a dog"\n',
                                        r"line 2 is a JSON string, not an object: write one object per line"),
    "json: broken": ("p.json", '[{"prompt": "a cat"},\n {"prompt": "a dog"]',
                     r"is not valid JSON \(.* at line 2, column \d+\): fix the file"),
    "json: no array": ("p.json", '{"prompt": "a cat"}', r"holds a JSON object, not an array: write \["),
    "csv: an unclosed quote": ("p.csv", 'prompt,id\n"an unclosed quote,1\n',
                               r"is not a valid CSV table \(CSV parse error.*\): fix the file"),
    "csv: empty": ("empty.csv", "", r"empty\.csv is empty: write a header row"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tables(tmp_path, case):
    name, text, message = MALFORMED[case]
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        read_prompts(tmp_path / name)
    assert "\n" not in str(caught.value)


def test_a_corrupt_parquet_file(tmp_path):
    parquet = _write(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    parquet.write_bytes(parquet.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"is not a readable Parquet file \(.*\): write it again") as caught:
        read_prompts(parquet)
    assert "\n" not in str(caught.value)


def test_distill_help_shows_prompt_column(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    assert "--prompt_column" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--help"])
    assert "--prompt_column" in capsys.readouterr().out


def test_distill_and_plan_pass_the_column(tmp_path, capsys):
    path = _write(tmp_path / "p.csv", [{"text": p} for p in PROMPTS])
    plan = ["plan", "--data_path", str(path), "--height", "64", "--width", "64"]
    assert main([*plan, "--prompt_column", "text"]) == 0
    capsys.readouterr()
    assert main(plan) == 2 and "has no column 'prompt': its columns are 'text'" in capsys.readouterr().err
    status = main(["distill", "--data_path", str(path), "--prompt_column", "caption", "--output_dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.err + captured.out
    assert len(captured.err.splitlines()) == 1 and "has no column 'caption': its columns are 'text'" in captured.err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_bad_column_exits_non_zero_in_one_line_without_a_traceback(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"text": "a cat"}])
    command = [sys.executable, "-m", "wandistiller", "distill", "--data_path", str(path), "--prompt_column", "caption",
               "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "has no column 'caption': its columns are 'text'; name the one holding the prompts with --prompt_column" \
        in done.stderr
