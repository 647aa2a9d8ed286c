"""Nothing the user owns is replaced: an output folder is replaced only when it is empty or
diffplat's own (its marker, or a file every such output has), and the refusal comes first,
naming the path and one file in it, with the folder untouched."""

import os

import pytest

from diffplat.fileio import MARKER, NotOurs, replace_dir


def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path):
    mine = tmp_path / "cache"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(NotOurs, match=r"cache is not empty and is not a cache diffplat wrote \(it holds 'notes.txt'"):
        with replace_dir(mine, "cache", ("cache_info.json",)):
            pytest.fail("work started on a folder that is not ours")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    afile = tmp_path / "thesis.tex"
    afile.write_text("chapter 1")
    with pytest.raises(NotOurs, match="is a file"):
        with replace_dir(afile, "adapter"):
            pass
    assert afile.read_text() == "chapter 1"


def test_empty_marked_and_older_diffplat_folders_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    with replace_dir(tmp_path / "empty", "cache") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "empty" / "a").read_text() == "1" and (tmp_path / "empty" / MARKER).is_file()
    with replace_dir(tmp_path / "empty", "cache") as tmp:  # now marked: ours to replace
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [MARKER, "b"]
    older = tmp_path / "older"  # written before the marker: its own cache_info.json says it is ours
    older.mkdir()
    (older / "cache_info.json").write_text("{}")
    with replace_dir(older, "cache", ("cache_info.json",)) as tmp:
        (tmp / "c").write_text("3")
    assert (older / "c").is_file() and not (older / "cache_info.json").exists()


def test_tiny_model_refuses_a_folder_with_someone_elses_files(tmp_path, capsys):
    from diffplat.cli import main

    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    assert main(["tiny-model", str(out)]) == 2  # the command's code, in this process (no second start-up)
    err = capsys.readouterr().err
    assert "thesis.tex" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "chapter 1"


def test_a_dataset_handed_to_ultralytics_cannot_rewrite_the_originals(tmp_path):
    """BDD -> YOLO exports and evaluation mixes link the user's images. A JPEG without its end
    marker at its very end is one ultralytics "restores" by saving over it: such a file is copied, never linked,
    and training on the set leaves the original's bytes as they were."""
    import io

    from PIL import Image

    from diffplat.data.bdd_exports import Labelled, write_yolo
    from diffplat.filter.yolo import setup_ultralytics

    originals = tmp_path / "originals"
    originals.mkdir()
    items = []
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (40 * i, 120, 200)).save(buf, "JPEG")
        # the first has bytes after its end marker (as some cameras write): readable, but not ending in it
        data = buf.getvalue() + b"\x00\x00" if i == 0 else buf.getvalue()
        (originals / f"f{i}.jpg").write_bytes(data)
        items.append(Labelled(originals / f"f{i}.jpg", "", 64, 48, None, (("car", 8.0, 8.0, 40.0, 30.0),)))
    before = (originals / "f0.jpg").read_bytes()
    write_yolo(tmp_path / "yolo", items)
    exported = tmp_path / "yolo" / "images" / "train"
    assert os.stat(exported / "f0.jpg").st_ino != os.stat(originals / "f0.jpg").st_ino  # a copy
    assert os.stat(exported / "f1.jpg").st_ino == os.stat(originals / "f1.jpg").st_ino  # a sound one is linked
    setup_ultralytics()
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").train(data=str(tmp_path / "yolo" / "data.yaml"), epochs=1, imgsz=64, batch=2, workers=0,
                               device="cpu", plots=False, val=False, project=str(tmp_path / "runs"), name="t",
                               verbose=False)  # fmt: skip
    assert (exported / "f0.jpg").read_bytes() != before  # ultralytics did re-save the set's copy
    assert (originals / "f0.jpg").read_bytes() == before
