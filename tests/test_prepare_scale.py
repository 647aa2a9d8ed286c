"""prepare on Ray Data: shards built by parallel tasks, reused on a rerun, duplicates dropped
across shards, images scaled down, every bad input counted."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffplat.config import PrepareConfig
from diffplat.data.prepare import NothingUsable, prepare


def _picture(path: Path, shade: int, size=(48, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 90)).save(path)
    path.with_suffix(".txt").write_text(f"picture {path.stem}\n")


def _shard_rows(data: Path) -> list[list[str]]:
    return [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in sorted((data / "shards").glob("*.parquet"))]


def test_parallel_shards_reused_on_rerun_and_duplicates_kept_once(tmp_path, local_ray, caplog):
    folder = tmp_path / "pics"
    for i in range(10):
        _picture(folder / f"p{i:02d}.png", 20 * i)
    (folder / "p09.png").write_bytes((folder / "p01.png").read_bytes())  # shard 3 repeats shard 1's picture
    _picture(folder / "p10.png", 250, size=(400, 100))  # scaled down to 200x50
    config = PrepareConfig(source="folder", folder={"images": str(folder)}, output=str(tmp_path / "data"),
                           rows_per_shard=4, max_image_side=200)  # fmt: skip
    report = prepare(config, Path)
    assert _shard_rows(tmp_path / "data") == [["p00", "p01", "p02", "p03"], ["p04", "p05", "p06", "p07"], ["p08", "p10"]]
    assert report["skipped"] == {"duplicate image": 1} and report["shards_reused"] == 0
    assert "p09.png: duplicate image (same content as p01.png)" in report["skipped_items"]
    big = pq.read_table(tmp_path / "data" / "shards" / "shard-00002.parquet").to_pylist()[1]
    assert (big["width"], big["height"]) == (200, 50) and Image.open(__import__("io").BytesIO(big["image"])).size == (200, 50)
    manifest = json.loads((tmp_path / "data" / "shards" / "_manifest.json").read_text())
    assert manifest["rows"] == 10 and [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["bytes"] == sum(p.stat().st_size for p in (tmp_path / "data" / "shards").glob("*.parquet"))
    index = (tmp_path / "data" / "index_lora.jsonl").read_text().splitlines()
    assert [json.loads(line)["caption"] for line in index][:2] == ["picture p00", "picture p01"]

    # a rerun with nothing changed makes no shard again; an edited caption makes only its shard
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").glob("*.parquet")}
    assert prepare(config, Path)["shards_reused"] == 3
    (folder / "p05.txt").write_text("an edited caption\n")
    report = prepare(config, Path)
    assert report["shards_reused"] == 2 and report["skipped"] == {"duplicate image": 1}
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").glob("*.parquet")}
    assert [name for name in sorted(before) if before[name] != after[name]] == ["shard-00001.parquet"]
    rows = pq.read_table(tmp_path / "data" / "shards" / "shard-00001.parquet").to_pylist()
    assert rows[1]["caption"] == "an edited caption"
    # shard 2 lost p09 to p01 in shard 0: when p01 changes, p09 is no longer a copy and comes back
    _picture(folder / "p01.png", 123)
    report = prepare(config, Path)
    assert report["shards_reused"] == 1 and report["skipped"] == {}
    assert _shard_rows(tmp_path / "data")[2] == ["p08", "p09", "p10"]

    # a rerun in which nothing is usable fails and leaves the good shards where they were
    for picture in folder.glob("*.png"):
        picture.write_bytes(b"")
    with pytest.raises(NothingUsable):
        prepare(config, Path)
    assert _shard_rows(tmp_path / "data")[0] == ["p00", "p01", "p02", "p03"]


def test_every_bad_input_is_named_and_counted(tmp_path, local_ray):
    folder = tmp_path / "pics"
    for name in ("good", "zero", "truncated", "corrupt", "huge", "nocaption", "empty", "latin1", "copy"):
        _picture(folder / f"{name}.png", 40 + len(name), size=(300, 300) if name == "huge" else (48, 32))
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:60])
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    (folder / "copy.png").write_bytes((folder / "good.png").read_bytes())
    (folder / "nocaption.txt").unlink()
    (folder / "empty.txt").write_text("  \n")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _picture(folder / "twin.png", 7)
    Image.new("RGB", (48, 32), (1, 2, 3)).save(folder / "twin.jpg")  # two files, one base name
    config = PrepareConfig(source="folder", folder={"images": str(folder)}, output=str(tmp_path / "data"),
                           max_image_pixels=200 * 200, rows_per_shard=3)  # fmt: skip
    report = prepare(config, Path)
    assert report["rows_written"] == 2  # copy.png (the first of the two equal pictures) and twin.jpg
    assert report["skipped"] == {"zero-byte image": 1, "corrupt image": 2, "image over the pixel limit": 1,
                                 "missing caption": 1, "empty caption": 1, "caption not UTF-8": 1,
                                 "duplicate image": 1, "duplicate name": 1}  # fmt: skip
    named = "\n".join(report["skipped_items"])
    for name in ("zero.png", "truncated.png", "corrupt.png", "huge.png", "nocaption.png", "empty.png", "latin1.png",
                 "copy.png", "twin.png"):  # fmt: skip
        assert name in named

    # diffusers' metadata.jsonl: malformed lines and records are named by line
    meta = tmp_path / "meta"
    _picture(meta / "a.png", 10)
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a picture"}\n{not json\n'
                                         '{"file_name": "b.png", "text": "gone"}\n{"text": "no name"}\n')  # fmt: skip
    config = PrepareConfig(source="folder", folder={"images": str(meta)}, output=str(tmp_path / "data2"))
    report = prepare(config, Path)
    assert report["rows_written"] == 1
    assert report["skipped"] == {"not JSON": 1, "no such image": 1, "no file_name": 1}
    assert "metadata.jsonl line 2: not JSON (Expecting property name enclosed in double quotes)" in report["skipped_items"]
