"""Prompt lists from txt / JSONL / parquet / the toy world."""

from __future__ import annotations

import json

import pytest

from fastpref.data.prompts import Prompt, PromptSource, read_prompts


def test_txt_skips_blank_lines_and_numbers_ids_by_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  two blue squares  \n")
    expected = [Prompt("00000000", "a red circle"), Prompt("00000002", "two blue squares")]
    assert read_prompts(PromptSource(str(path))) == expected


def test_jsonl_with_caption_and_id_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"uid": f"u{i}", "caption": f"text {i}"}) + "\n" for i in range(4)))
    prompts = read_prompts(PromptSource(str(path), limit=3))
    assert prompts == [Prompt(f"u{i}", f"text {i}") for i in range(3)]


def test_parquet_with_named_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"my_text": ["x", "y", "x"]}), path)
    prompts = read_prompts(PromptSource(str(path), field="my_text", deduplicate=True))
    assert [p.text for p in prompts] == ["x", "y"] and prompts[1].id == "00000001"
    with pytest.raises(KeyError, match="no prompt column/key 'text2'"):
        read_prompts(PromptSource(str(path), field="text2"))


def test_toy_split():
    from fastpref.toy import world

    prompts = read_prompts(PromptSource("toy:eval"))
    assert [p.text for p in prompts] == [s.caption for s in world.eval_prompts()]
    with pytest.raises(ValueError, match="toy:test"):
        read_prompts(PromptSource("toy:test"))


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n')
    with pytest.raises(ValueError, match="prompt id '1' appears twice"):
        read_prompts(PromptSource(str(path)))
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl: line 2: invalid JSON"):
        read_prompts(PromptSource(str(path)))
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match="row 2: 'prompt' is empty"):
        read_prompts(PromptSource(str(path)))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(PromptSource(str(tmp_path / "nope.txt")))
    (tmp_path / "p.csv").write_text("a")
    with pytest.raises(ValueError, match="unknown extension '.csv'"):
        read_prompts(PromptSource(str(tmp_path / "p.csv")))


def test_toy_train_balanced_cycles_categories_evenly():
    from collections import Counter

    from fastpref.toy import world

    prompts = read_prompts(PromptSource("toy:train-balanced", limit=60))
    categories = [world.parse_caption(p.text).category for p in prompts]
    assert Counter(categories) == {c: 10 for c in world.CATEGORIES}
    assert len({p.id for p in prompts}) == 60  # repeated captions get their own ids
    train = {s.caption for s in world.train_prompts()}
    assert {p.text for p in prompts} <= train
    everything = read_prompts(PromptSource("toy:train-balanced"))
    largest = max(Counter(s.category for s in world.train_prompts()).values())
    assert len(everything) == largest * len(world.CATEGORIES)
    assert {p.text for p in everything} == train  # every training caption appears
