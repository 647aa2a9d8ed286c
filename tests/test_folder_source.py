"""`prepare.source: folder`: images with `.txt` captions, or diffusers' metadata.jsonl."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffplat.config import PrepareConfig
from diffplat.data.prepare import NothingUsable, prepare


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (10 * i, 80, 160)).save(folder / name)


def _prepare(tmp_path, **folder):
    config = PrepareConfig(source="folder", folder=folder, output=str(tmp_path / "data"))
    return prepare(config, Path)


def _rows(tmp_path) -> list[dict]:
    return [r for p in sorted((tmp_path / "data" / "shards").glob("*.parquet"))
            for r in pq.read_table(p, columns=["id", "caption", "width"]).to_pylist()]  # fmt: skip


def test_text_captions_beside_the_images_with_bad_items_named(tmp_path):
    folder = tmp_path / "pics"
    _images(folder, ["a.png", "b.png", "c.png", "d.png"])
    (folder / "a.txt").write_text("a red car on a bridge\n")
    (folder / "b.txt").write_text("   ")
    (folder / "c.txt").write_bytes(b"\xff\xfe caption")
    (folder / "e.png").write_bytes(b"not a png")
    (folder / "e.txt").write_text("a broken image")
    report = _prepare(tmp_path, images=str(folder))
    assert [(r["id"], r["caption"], r["width"]) for r in _rows(tmp_path)] == [("a", "a red car on a bridge", 40)]
    assert report["skipped"] == {"empty caption": 1, "caption not UTF-8": 1, "missing caption": 1, "corrupt image": 1}
    assert "b.png: empty caption (b.txt)" in report["skipped_items"]
    assert any(s.startswith("d.png: missing caption (no d.txt)") for s in report["skipped_items"])
    index = [json.loads(line) for line in (tmp_path / "data" / "index_lora.jsonl").read_text().splitlines()]
    assert index == [{"image": str(folder / "a.png"), "caption": "a red car on a bridge"}]


def test_metadata_jsonl_as_diffusers_image_folders_have_it(tmp_path):
    folder = tmp_path / "imagefolder"
    _images(folder, ["x.png", "sub/y.png"])
    lines = [
        {"file_name": "x.png", "caption": "a van at dusk"},
        {"file_name": "sub/y.png", "caption": "a bus in the rain"},
        {"file_name": "gone.png", "caption": "nothing there"},
        {"file_name": "../x.png", "caption": "outside"},
        {"file_name": "x.png"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    report = _prepare(tmp_path, images=str(folder), caption_column="caption")
    assert sorted((r["id"], r["caption"]) for r in _rows(tmp_path)) == [("x", "a van at dusk"), ("y", "a bus in the rain")]
    assert report["skipped"] == {"no such image": 1, "file_name leaves the folder": 1,
                                 "no caption in field 'caption'": 1, "not JSON": 1}  # fmt: skip


def test_a_rerun_with_nothing_usable_keeps_the_previous_shards(tmp_path):
    folder = tmp_path / "pics"
    _images(folder, ["a.png"])
    (folder / "a.txt").write_text("a tram")
    _prepare(tmp_path, images=str(folder))
    (folder / "a.txt").unlink()
    with pytest.raises(NothingUsable, match="no usable rows"):
        _prepare(tmp_path, images=str(folder))
    assert [r["caption"] for r in _rows(tmp_path)] == ["a tram"]


def test_every_kind_of_bad_image_is_its_own_count(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    _images(folder, ["ok.png", "big.png"])
    Image.new("RGB", (400, 300)).save(folder / "big.png")
    (folder / "zero.png").write_bytes(b"")
    good = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "junk.png").write_bytes(b"GIF89a not really")
    for name in ("ok", "big", "zero", "cut", "junk"):
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    config = PrepareConfig(source="folder", folder={"images": str(folder)}, output=str(tmp_path / "data"),
                           max_image_pixels=100_000)  # fmt: skip
    report = prepare(config, Path)
    assert report["rows_written"] == 1
    assert report["skipped"] == {"zero-byte image": 1, "image over the pixel limit": 1, "corrupt image": 2}
    assert any(s.startswith("big.png: image over the pixel limit (400x300 > 100000 pixels)") for s in report["skipped_items"])


def test_the_same_picture_under_two_names_is_kept_once(tmp_path):
    folder = tmp_path / "pics"
    _images(folder, ["a.png", "b.png"])
    (folder / "copy.png").write_bytes((folder / "a.png").read_bytes())
    for name in ("a", "b", "copy"):
        (folder / f"{name}.txt").write_text(f"picture {name}")
    report = _prepare(tmp_path, images=str(folder))
    assert sorted(r["id"] for r in _rows(tmp_path)) == ["a", "b"]
    assert report["skipped"] == {"duplicate image": 1}
    assert "copy.png: duplicate image (same content as a.png)" in report["skipped_items"]


def test_shards_of_another_run_are_checked_deduplicated_and_resharded(tmp_path):
    from diffplat.data.shards import write_shards

    folder = tmp_path / "pics"
    _images(folder, ["a.png", "b.png", "c.png"])
    rows = [{"id": p.stem, "image": p.read_bytes(), "caption": f"picture {p.stem}", "width": 40, "height": 30,
             "source": "folder"} for p in sorted(folder.glob("*.png"))]  # fmt: skip
    rows += [{**rows[0], "id": "again"}, {**rows[1], "id": "broken", "image": rows[1]["image"][:40]}]
    write_shards(rows, tmp_path / "other" / "shards", rows_per_shard=5)
    config = PrepareConfig(source="shards", shards={"path": str(tmp_path / "other" / "shards")},
                           output=str(tmp_path / "data"), rows_per_shard=2)  # fmt: skip
    report = prepare(config, Path)
    # shards are planned by input rows (at most rows_per_shard rows each): 5 rows -> 3 shards
    assert [r["id"] for r in _rows(tmp_path)] == ["a", "b", "c"] and len(report["shards"]) == 3
    assert report["skipped"] == {"duplicate image": 1, "corrupt image": 1}


def test_source_4_lora_csv_with_bad_lines_named(tmp_path):
    folder = tmp_path / "pics"
    _images(folder, ["a.png", "b.png"])
    index = tmp_path / "bdd_hf_dataset_lora_train.csv"
    index.write_text("image,text\npics/a.png,a car at night\npics/b.png,\npics/gone.png,nothing\n"
                     f"{folder / 'b.png'},an absolute path\n")  # fmt: skip
    report = _prepare(tmp_path, csv=str(index))
    assert sorted((r["id"], r["caption"]) for r in _rows(tmp_path)) == [("a", "a car at night"), ("b", "an absolute path")]
    assert report["skipped"] == {"missing caption": 1, "no image": 1}
    assert "bdd_hf_dataset_lora_train.csv line 4: no image (gone.png)" in report["skipped_items"]
    with pytest.raises(ValueError, match="give one of images"):
        PrepareConfig(source="folder", folder={"images": str(folder), "csv": str(index)})
