"""Prompt files, seeded sampling and clear errors for bad data files."""

import json

import pytest

from imagerl.config import DatasetConfig
from imagerl.data.prompts import DataError, PromptSampler, load_datasets, load_rows, slice_for_rank


def test_txt_jsonl_csv_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    assert [r["prompt"] for r in load_rows(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a sign", "text": "HI"}) + "\n")
    assert load_rows(str(tmp_path / "p.jsonl")) == [{"prompt": "a sign", "text": "HI"}]
    (tmp_path / "p.csv").write_text("caption,score\nx,1\ny,2\n")
    rows = load_rows(str(tmp_path / "p.csv"), prompt_field="caption")
    assert rows == [{"prompt": "x", "score": "1"}, {"prompt": "y", "score": "2"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p1", "p2"], "k": [1, 2]}), tmp_path / "p.parquet")
    assert load_rows(str(tmp_path / "p.parquet"))[1] == {"prompt": "p2", "k": 2}


def test_bom_whitespace_and_missing_prompts(tmp_path, caplog):
    # a BOM (Windows editors) is not part of the first prompt; a null or empty prompt is skipped with a warning
    # naming where, never trained on as the text 'None'
    (tmp_path / "bom.txt").write_bytes("\ufeffa red square on the left\r\nsecond\r\n".encode("utf-8"))
    assert [r["prompt"] for r in load_rows(str(tmp_path / "bom.txt"))] == ["a red square on the left", "second"]
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,color\nx,red\n".encode("utf-8"))
    assert load_rows(str(tmp_path / "bom.csv")) == [{"prompt": "x", "color": "red"}]
    (tmp_path / "mix.jsonl").write_text('{"prompt": "a", "k": 1}\n{"prompt": null}\n\n{"prompt": " b "}\n{"prompt": ""}\n')
    with caplog.at_level("WARNING"):
        assert load_rows(str(tmp_path / "mix.jsonl")) == [{"prompt": "a", "k": 1}, {"prompt": "b"}]
    assert "mix.jsonl: skipped 2 of 4 rows whose 'prompt' is empty or null (the first at line 2)" in caplog.text
    # lines end at newlines only: U+2028 or a form feed inside a prompt does not cut it in two
    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "a poster\u2028reading SALE"}, ensure_ascii=False) + "\n")
    assert load_rows(str(tmp_path / "u.jsonl")) == [{"prompt": "a poster\u2028reading SALE"}]
    (tmp_path / "ff.txt").write_text("a sign\x0creading OPEN\n")
    assert len(load_rows(str(tmp_path / "ff.txt"))) == 1
    # an empty CSV cell is a missing value (None, like a parquet null), so rewards fall back to the prompt
    (tmp_path / "cells.csv").write_text('prompt,text\n"a sign, says ""SALE""",\n')
    assert load_rows(str(tmp_path / "cells.csv")) == [{"prompt": 'a sign, says "SALE"', "text": None}]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt' is empty"):
        load_rows(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not valid JSON: .* \(column \d+\)$"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(DataError, match="no 'prompt' field.*prompt_field"):
        load_rows(str(tmp_path / "nofield.jsonl"))
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="corrupt.parquet"):
        load_rows(str(tmp_path / "corrupt.parquet"))
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        load_rows(str(tmp_path / "x.docx"))
    # an unquoted comma inside a field shifts every later column: an error naming the row, not silent metadata
    (tmp_path / "shift.csv").write_text('prompt,text\na neon sign that says "OPEN", above a door,OPEN\n')
    with pytest.raises(DataError, match=r"shift.csv line 2 has 3 cells for 2 columns; quote fields that contain commas"):
        load_rows(str(tmp_path / "shift.csv"))
    # the line in the file, where the row ends, also after quoted newlines and blank lines (was: the record count)
    (tmp_path / "late.csv").write_text('prompt,text\n"two\nlines",a\n\nok,b\nbad, row,c\n')
    with pytest.raises(DataError, match=r"late.csv line 6 has 3 cells"):
        load_rows(str(tmp_path / "late.csv"))
    (tmp_path / "dup.csv").write_text("prompt,text,prompt\na,b,\n")
    with pytest.raises(DataError, match=r"dup.csv has the column name\(s\) \['prompt'\] more than once in its header"):
        load_rows(str(tmp_path / "dup.csv"))
    (tmp_path / "excel.csv").write_text("prompt,,\na red cat,,\n")  # (empty trailing columns are no duplicates)
    assert [r["prompt"] for r in load_rows(str(tmp_path / "excel.csv"))] == ["a red cat"]
    # a prompt must be one string: a list or an object became its Python repr, trained on as text
    for bad, kind in (('["a red cat", "a blue dog"]', "list"), ('{"en": "a cat"}', "dict"), ("true", "bool")):
        (tmp_path / "odd.jsonl").write_text('{"prompt": "fine"}\n{"prompt": %s}\n' % bad)
        with pytest.raises(DataError, match=rf"odd.jsonl line 2 has a {kind} as its 'prompt' \(.*\); each row's prompt "
                                            r"must be one string"):
            load_rows(str(tmp_path / "odd.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"prompt": 42}\n{"prompt": []}\n')
    assert [r["prompt"] for r in load_rows(str(tmp_path / "num.jsonl"))] == ["42"]  # ([] is an empty prompt: skipped)
    (tmp_path / "blank.csv").write_text('prompt,x\n,1\n"  ",2\n')
    with pytest.raises(DataError, match=r"every one of the 2 rows of '.*blank.csv' has an empty or null 'prompt'"):
        load_rows(str(tmp_path / "blank.csv"))
    with pytest.raises(DataError, match=r"^data.datasets\[2\].path: unknown built-in dataset 'builtin:color'\. "
                                        r"Did you mean 'builtin:colors'\? Available: builtin:color_shapes, builtin:colors"):
        load_rows("builtin:color", field_name="data.datasets[2].path")


def test_sampler_seeded_epochs_and_resume():
    ds = load_datasets([DatasetConfig(path="builtin:colors")])
    a = PromptSampler(ds, seed=3)
    seen = [p for _ in range(2) for p in a.next_batch(4)[0].prompts]
    assert sorted(seen) == sorted(r["prompt"] for r in ds[0].rows)  # one epoch = every prompt once
    state = a.state_dict()
    nxt = a.next_batch(4)[0].prompts
    b = PromptSampler(ds, seed=3)
    b.load_state_dict(state)
    assert b.next_batch(4)[0].prompts == nxt
    c = PromptSampler(ds, seed=4)
    assert [c.next_batch(8)[0].prompts] != [seen]


def test_mixture_weights_and_reward_weights(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"a{i}" for i in range(50)))
    (tmp_path / "b.txt").write_text("\n".join(f"b{i}" for i in range(50)))
    ds = load_datasets([DatasetConfig(path=str(tmp_path / "a.txt"), weight=3.0, reward_weights={"ocr": 2.0}),
                        DatasetConfig(path=str(tmp_path / "b.txt"), weight=1.0)])
    s = PromptSampler(ds, seed=0)
    batch, rw = s.next_batch(400)
    frac_a = sum(p.startswith("a") for p in batch.prompts) / 400
    assert 0.67 < frac_a < 0.83
    assert all((w == {"ocr": 2.0}) == p.startswith("a") for w, p in zip(rw, batch.prompts))
    assert set(batch.dataset_names) == {"a", "b"}
    # neighbouring run seeds give unrelated mixture choices, not shifted copies of one stream
    picks = {seed: [p[0] for p in PromptSampler(ds, seed=seed).next_batch(300)[0].prompts] for seed in (0, 1)}
    assert all(picks[1][:100] != picks[0][k:k + 100] for k in range(200))


def test_slice_for_rank():
    ds = load_datasets([DatasetConfig(path="builtin:colors")])
    batch, rw = PromptSampler(ds, 0).next_batch(4)
    parts = [slice_for_rank(batch, rw, r, 2) for r in range(2)]
    assert parts[0][0].prompts + parts[1][0].prompts == batch.prompts
    assert parts[1][2] == 2
    with pytest.raises(ValueError, match="divisible"):
        slice_for_rank(batch, rw, 0, 3)


def test_editing_rows_bring_their_source_images(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(tmp_path / "blue.png")
    rows = [{"prompt": "make it green", "image": "img/red.png"}, {"prompt": "make it red", "image": str(tmp_path / "blue.png")},
            {"prompt": "a cat"}]
    (tmp_path / "edit.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_datasets([DatasetConfig(path=str(tmp_path / "edit.jsonl"))])
    batch, _ = PromptSampler(ds, seed=0).next_batch(6)  # two epochs of three rows
    for prompt, src, meta in zip(batch.prompts, batch.source_images, batch.metadata):
        want = {"make it green": ((6, 4), (255, 0, 0)), "make it red": ((4, 4), (0, 0, 255)), "a cat": None}[prompt]
        assert (src is None) if want is None else (src.mode == "RGB" and (src.size, src.getpixel((0, 0))) == want)
        assert "image" in meta or prompt == "a cat"  # (the path stays in the metadata)
    # image_field '' is text-to-image data; a batch with no source image at all has none
    ds = load_datasets([DatasetConfig(path=str(tmp_path / "edit.jsonl"), image_field="")])
    assert PromptSampler(ds, seed=0).next_batch(3)[0].source_images is None
    # a missing file fails at start, naming the row, the file and the way out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "gone.png"}))
    with pytest.raises(DataError, match=r"^data.datasets\[0\]: row 0 names source image '.*gone.png' .*image_field: ''"):
        load_datasets([DatasetConfig(path=str(tmp_path / "bad.jsonl"))])


def test_limit_keeps_the_first_rows(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"p{i}" for i in range(10)))
    ds = load_datasets([DatasetConfig(path=str(tmp_path / "p.txt"), limit=3)])
    assert [r["prompt"] for r in ds[0].rows] == ["p0", "p1", "p2"]
