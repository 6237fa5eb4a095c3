"""SFT prompt+image pairs: built-in drawings, image files, and clear errors for missing or corrupt images."""

import json

import pytest
import torch
from PIL import Image

from imagerl.config import DatasetConfig
from imagerl.data.pairs import draw_shape, sft_batch
from imagerl.data.prompts import DataError


def test_builtin_pairs_draw_the_prompt():
    b = sft_batch([DatasetConfig(path="builtin:colors")], 3, torch.Generator().manual_seed(0), size=32)
    assert b["images"].shape == (3, 3, 32, 32) and len(b["prompts"]) == 3
    red_left = draw_shape("red", "square", "left", 32)
    assert red_left[0, 16, 8] == 1 and red_left[1, 16, 8] == 0  # red inside the left square
    assert torch.allclose(red_left[:, 16, 28], torch.full((3,), 0.5))  # grey canvas on the right


def test_limit_keeps_the_first_pairs(tmp_path):
    # data.sft_datasets[].limit, as data.datasets[].limit: only the first rows are drawn (it was accepted and ignored)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "image": "a.png"}) + "\n" for i in range(6)))
    b = sft_batch([DatasetConfig(path=str(tmp_path / "p.jsonl"), limit=2)], 40, torch.Generator().manual_seed(0), size=8)
    assert set(b["prompts"]) == {"p0", "p1"}
    b = sft_batch([DatasetConfig(path="builtin:colors", limit=1)], 5, torch.Generator().manual_seed(0), size=8)
    assert len(set(b["prompts"])) == 1


def test_slices_of_one_draw_are_the_whole_draw():
    # each process keeps its slice of the same n draws: the slices put together are the one-process batch
    specs = [DatasetConfig(path="builtin:colors"), DatasetConfig(path="builtin:color_shapes", weight=2.0)]
    whole = sft_batch(specs, 6, torch.Generator().manual_seed(3), size=16)
    parts = [sft_batch(specs, 6, torch.Generator().manual_seed(3), size=16, keep=range(r * 3, r * 3 + 3)) for r in (0, 1)]
    assert parts[0]["prompts"] + parts[1]["prompts"] == whole["prompts"]
    assert torch.equal(torch.cat([p["images"] for p in parts]), whole["images"])
    assert len(set(whole["prompts"])) > 1


def test_relative_images_next_to_a_file_given_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "blue", "image": "blue.png"}))
    b = sft_batch([DatasetConfig(path="~/p.jsonl")], 1, torch.Generator().manual_seed(0), size=4)
    assert torch.allclose(b["images"][0, 2], torch.ones(4, 4))


def test_images_load_as_displayed(tmp_path):
    from imagerl.data.pairs import load_image

    # transparency onto white (not black), 16-bit greyscale scaled (not clipped to white), EXIF orientation applied
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0, 255))
    im.save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png", 4, "f")
    assert t[:, 1, 1].tolist() == [1.0, 1.0, 1.0] and t[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    Image.fromarray(__import__("numpy").full((4, 4), 32768, dtype="uint16")).save(tmp_path / "g16.png")
    assert abs(float(load_image(tmp_path / "g16.png", 4, "f").mean()) - 0.5) < 0.01
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 2, 2))  # stored: left half white; orientation 6 shows it rotated 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = load_image(tmp_path / "r.jpg", 4, "f").mean(0)  # displayed 2 wide, 4 tall: white on top
    assert float(shown[:2].mean()) > 0.9 and float(shown[2:].mean()) < 0.1


def test_image_files_and_errors(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"prompt": "red", "image": "red.png"}]
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    b = sft_batch([DatasetConfig(path=str(tmp_path / "ok.jsonl"))], 2, torch.Generator().manual_seed(0), size=8)
    assert torch.allclose(b["images"][:, 0], torch.ones(2, 8, 8)) and b["prompts"] == ["red", "red"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "broken.png"}))
    with pytest.raises(DataError, match="broken.png' is corrupt"):
        sft_batch([DatasetConfig(path=str(tmp_path / "bad.jsonl"))], 1, torch.Generator(), size=8)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "x", "image": "nope.png"}))
    with pytest.raises(DataError, match="nope.png' does not exist"):
        sft_batch([DatasetConfig(path=str(tmp_path / "missing.jsonl"))], 1, torch.Generator(), size=8)
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"prompt": "x", "picture": "red.png"}))
    with pytest.raises(DataError, match="no 'image' field; set image_field"):
        sft_batch([DatasetConfig(path=str(tmp_path / "nofield.jsonl"))], 1, torch.Generator(), size=8)
    # at start, not at the first SFT step: a missing image file, an empty image field
    from imagerl.data.pairs import check_sft_datasets

    (tmp_path / "gone.jsonl").write_text(json.dumps({"prompt": "x", "image": "gone.png"}))
    with pytest.raises(DataError, match=r"^data.sft_datasets\[0\]: image file '.*gone.png' does not exist"):
        check_sft_datasets([DatasetConfig(path=str(tmp_path / "gone.jsonl"))])
    (tmp_path / "null.jsonl").write_text(json.dumps({"prompt": "x", "image": None}))
    with pytest.raises(DataError, match=r"null.jsonl row 0 has an empty 'image'"):
        check_sft_datasets([DatasetConfig(path=str(tmp_path / "null.jsonl"))])
