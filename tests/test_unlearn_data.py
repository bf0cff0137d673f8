"""The LUME / SemEval-2025 Task 4 loader on the real public splits, other layouts, and bad data.

The real data is read in place from ../shared/data/lume (beside the repository), never copied into it.
Expected counts and fields are re-derived here by reading the files with `json` directly.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LUME, needs_lume
from umerge.errors import InputError
from umerge.unlearn.data import load_rows, load_task_data, parse_kind, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def raw(split: str) -> list[dict]:
    with (LUME / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@needs_lume
def test_lume_directory_loads_every_row_with_its_kind() -> None:
    data = load_task_data(LUME)
    for split in ("forget", "retain"):
        rows, want = getattr(data, split), raw(split)
        assert len(rows) == len(want)
        assert [(r.id, r.input, r.output, r.task) for r in rows] == [(w["id"], w["input"], w["output"], w["task"]) for w in want]
        assert all(r.split == split for r in rows)
        kinds = collections.Counter((r.kind, r.kind_index) for r in rows)
        want_kinds = collections.Counter((w["id"][-3:-1], int(w["id"][-1])) for w in want)
        assert kinds == want_kinds
        assert set(kinds) == {("sc", 1), ("qa", 0), ("qa", 1), ("qa", 2), ("qa", 3), ("qa", 4)}
    # the sizes SOURCE.md states
    assert (len(data.forget), len(data.retain)) == (2732, 2734)
    assert sum(r.is_sentence_completion for r in data.forget) == sum(w["id"].endswith("sc1") for w in raw("forget"))


@needs_lume
def test_explicit_files_and_head() -> None:
    data = load_task_data(forget=LUME / "forget.jsonl", retain=LUME / "retain.jsonl").head(5, 3)
    assert [r.id for r in data.forget] == [w["id"] for w in raw("forget")[:5]]
    assert [r.id for r in data.retain] == [w["id"] for w in raw("retain")[:3]]


@needs_lume
def test_other_layouts_give_the_same_rows(tmp_path: Path) -> None:
    forget, retain = raw("forget")[:6], raw("retain")[:4]
    want = load_task_data(forget=LUME / "forget.jsonl", retain=LUME / "retain.jsonl").head(6, 4)
    key = lambda d: ([(r.id, r.input, r.output, r.task, r.split) for r in d.forget], [(r.id, r.input, r.output, r.task, r.split) for r in d.retain])  # noqa: E731

    # column-oriented JSON as pandas.DataFrame.to_json() writes it: {"field": {"0": v, "1": v}}
    for split, rows in (("forget", forget), ("retain", retain)):
        cols = {f: {str(i): r[f] for i, r in enumerate(rows)} for f in ("id", "input", "output", "task")}
        (tmp_path / "cols").mkdir(exist_ok=True)
        (tmp_path / "cols" / f"{split}.json").write_text(json.dumps(cols))
    assert key(load_task_data(tmp_path / "cols")) == key(want)

    # column-oriented with lists, and a JSON array of rows
    for split, rows in (("forget", forget), ("retain", retain)):
        (tmp_path / "lists").mkdir(exist_ok=True)
        (tmp_path / "lists" / f"{split}.json").write_text(json.dumps({f: [r[f] for r in rows] for f in rows[0]}))
        (tmp_path / "array").mkdir(exist_ok=True)
        (tmp_path / "array" / f"{split}.json").write_text(json.dumps(rows))
    assert key(load_task_data(tmp_path / "lists")) == key(want)
    assert key(load_task_data(tmp_path / "array")) == key(want)

    # one file with a split column
    one = tmp_path / "all.jsonl"
    one.write_text("".join(json.dumps({**r, "split": s}) + "\n" for s, rs in (("retain", retain), ("forget", forget)) for r in rs))
    assert key(load_task_data(one)) == key(want)

    # write_jsonl round trip
    d = tmp_path / "rt"
    write_jsonl(want.forget, d / "forget.jsonl")
    write_jsonl(want.retain, d / "retain.jsonl")
    assert key(load_task_data(d)) == key(want)


def test_parquet_reads_or_says_what_to_install(tmp_path: Path) -> None:
    rows = [{"id": "a-sc1", "input": "x", "output": "y", "task": "Task1"}, {"id": "a-qa0", "input": "q", "output": "a", "task": "Task1"}]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas  # noqa: F401
        except ImportError:
            (tmp_path / "forget.parquet").write_bytes(b"PAR1not really parquetPAR1")
            with pytest.raises(InputError, match="pyarrow"):
                load_rows(tmp_path / "forget.parquet", "forget")
            return
        import pandas as pd

        pd.DataFrame(rows).to_parquet(tmp_path / "forget.parquet")
    else:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "forget.parquet")
    got = load_rows(tmp_path / "forget.parquet", "forget")
    assert [(r.id, r.input, r.output, r.kind, r.kind_index) for r in got] == [
        ("a-sc1", "x", "y", "sc", 1),
        ("a-qa0", "q", "a", "qa", 0),
    ]


def test_parse_kind() -> None:
    assert parse_kind('"8f24c511"sc1') == ("sc", 1)
    assert parse_kind("abcqa4") == ("qa", 4)
    assert parse_kind("abc") is None
    assert parse_kind("qa1-extra") is None


# ----------------------------------------------------------------------------------------------
# Bad data: one line, naming the file and the row


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


GOOD = json.dumps({"id": "doc1sc1", "input": "a", "output": "b", "task": "Task1"})


@pytest.mark.parametrize(
    "line, message",
    [
        (json.dumps({"id": "doc1qa0", "input": "a", "task": "Task1"}), r"row 2: missing field 'output'"),
        (json.dumps({"id": "doc1", "input": "a", "output": "b", "task": "Task1"}), r"row 2: id 'doc1' has no kind suffix"),
        (json.dumps({"id": "doc1qa0", "input": 3, "output": "b", "task": "Task1"}), r"row 2: field 'input' must be a string"),
        (json.dumps({"id": "doc1qa0", "input": "a", "output": "b", "task": "T", "split": "retain"}), r"row 2: row has split 'retain'"),
        ("{not json", r"row 2: not valid JSON"),
        ("[1, 2]", r"row 2: expected an object"),
    ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_row(tmp_path: Path, line: str, message: str) -> None:
    p = _write(tmp_path, "forget.jsonl", [GOOD, line])
    with pytest.raises(InputError, match=message) as info:
        load_rows(p, "forget")
    assert str(p) in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_split_and_missing_files(tmp_path: Path) -> None:
    _write(tmp_path, "forget.jsonl", [GOOD])
    _write(tmp_path, "retain.jsonl", [])
    with pytest.raises(InputError, match=r"the retain split is empty \(.*retain.jsonl\)"):
        load_task_data(tmp_path)
    (tmp_path / "retain.jsonl").unlink()
    with pytest.raises(InputError, match="no retain file"):
        load_task_data(tmp_path)
    with pytest.raises(InputError, match="no such data file"):
        load_task_data(tmp_path / "nowhere")
    single = _write(tmp_path, "one.jsonl", [GOOD])  # rows without a split column, given as one file
    with pytest.raises(InputError, match="no 'split' field"):
        load_task_data(single)


def test_cli_reports_bad_data_in_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "forget.jsonl", [GOOD, json.dumps({"id": "x", "input": "a", "output": "b", "task": "T"})])
    _write(tmp_path, "retain.jsonl", [GOOD])
    proc = subprocess.run(
        [sys.executable, "-c", "from umerge.cli import main; main()", "train", "--model", str(tmp_path),
         "--data", str(tmp_path), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("umerge: error: ") and "forget.jsonl: row 2: id 'x' has no kind suffix" in lines[0]
    assert not (tmp_path / "out").exists()


def test_train_cli_imports_no_torch_and_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, umerge.cli.train, umerge.unlearn; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import importlib.util

    import umerge.cli.train as cli_train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(InputError, match=r'needs peft, which is not installed: pip install "umerge\[train\]"'):
        cli_train._require_train_extra()


# ----------------------------------------------------------------------------------------------
# Tokenisation (needs torch)


class CharTokenizer:
    """One token per character (id = ord), eos = 0, and by default a BOS (id 1) in front, as many
    tokenizers add: makes truncation and special tokens checkable by eye."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.bos_token_id] * add_special_tokens + [ord(c) for c in text]}


@pytest.mark.train
def test_encode_truncates_prompt_from_the_left_and_labels_only_the_answer() -> None:
    pytest.importorskip("torch")
    from umerge.unlearn.tokenize import encode_example

    tok = CharTokenizer()
    # The prompt is encoded with the tokenizer's defaults (here: BOS first), the answer without.
    # max_length 10 -> prompt keeps its last floor(0.8 * 10) = 8 tokens (BOS cut with the rest, as
    # the reference's [-max_q_len:]); answer + eos fill the rest (2)
    e = encode_example(tok, "0123456789AB", "xyz", 10)
    assert e.input_ids == [ord(c) for c in "456789AB"] + [ord("x"), ord("y")]
    assert e.labels == [-100] * 8 + [ord("x"), ord("y")]
    # short prompt: untouched, BOS kept; answer followed by eos
    e = encode_example(tok, "ab", "xyz", 10)
    assert e.input_ids == [1, 97, 98, 120, 121, 122, 0]
    assert e.labels == [-100, -100, -100, 120, 121, 122, 0]
    assert e.prompt_len == 3
    # max_length 7 -> floor(5.6) = 5 prompt tokens
    e = encode_example(tok, "abcdefgh", "z", 7)
    assert e.input_ids == [ord(c) for c in "defgh"] + [122, 0]
    # an empty prompt is still encoded with the defaults: just the BOS
    assert encode_example(tok, "", "z", 7).input_ids == [1, 122, 0]


@pytest.mark.train
def test_collate_pads_right_and_masks_labels() -> None:
    torch = pytest.importorskip("torch")
    from umerge.unlearn.tokenize import Encoded, collate

    b = collate([Encoded([5, 6, 7], [-100, 6, 7], 1), Encoded([8], [8], 0)], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert collate([Encoded([1], [1], 0)], 0, pad_to=4)["input_ids"].shape == torch.Size([1, 4])


@pytest.mark.train
def test_pairing_fixed_is_i_mod_n_and_random_is_reproducible() -> None:
    pytest.importorskip("torch")
    from umerge.unlearn.tokenize import Encoded, UnlearnDataset

    f = [Encoded([i], [i], 0) for i in range(7)]
    r = [Encoded([100 + j], [100 + j], 0) for j in range(3)]
    ds = UnlearnDataset(f, r, "fixed")
    assert [ds[i][1].input_ids[0] - 100 for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    rnd = UnlearnDataset(f, r, "random", seed=5)
    first = [rnd[i][1].input_ids[0] for i in range(7)]
    assert first == [rnd[i][1].input_ids[0] for i in range(7)]  # same epoch, same pairing
    rnd.set_epoch(1)
    second = [rnd[i][1].input_ids[0] for i in range(7)]
    assert all(100 <= x < 103 for x in first + second)
    assert first != second  # a new epoch draws a new pairing
