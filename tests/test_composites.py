"""Composites: layouts, panels where they belong, captions with markers, masks, the prepare source."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffplat.config import PrepareConfig
from diffplat.data.bdd import TIME_PHRASES
from diffplat.data.composites import (
    CompositeError,
    Layout,
    combine_captions,
    gradient_mask,
    make_composite,
    panel_mask,
    paste_fill,
    side_by_side,
)
from diffplat.data.prepare import NothingUsable, prepare

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _solid(colour, size):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("text, rows, cols", [("2x2", 2, 2), ("1x3", 1, 3), ("3x1", 3, 1), ("2X3", 2, 3)])
def test_layout_parses_rows_by_cols(text, rows, cols):
    layout = Layout.parse(text)
    assert (layout.rows, layout.cols, layout.panels) == (rows, cols, rows * cols)


@pytest.mark.parametrize("text", ["2by2", "x2", "1x1", "0x3", ""])
def test_bad_layouts_are_refused(text):
    with pytest.raises(CompositeError, match="layout"):
        Layout.parse(text)


@pytest.mark.parametrize("layout_text", ["2x2", "1x3", "3x1"])
def test_every_panel_lands_where_it_belongs(layout_text):
    layout = Layout.parse(layout_text)
    # inputs of different sizes and aspect ratios: each is scaled to cover, then centre-cropped
    images = [_solid(COLOURS[i], (40 + 13 * i, 30 + 7 * i)) for i in range(layout.panels)]
    composite = make_composite(images, layout, (32, 24))
    assert composite.size == (32 * layout.cols, 24 * layout.rows)
    pixels = np.asarray(composite)
    for i, (left, top, right, bottom) in enumerate(layout.boxes(*composite.size)):
        assert (left, top) == ((i % layout.cols) * 32, (i // layout.cols) * 24)
        assert (pixels[top:bottom, left:right] == COLOURS[i]).all(), f"panel {i}"


def test_panel_numbering_is_source_1s():
    boxes = Layout.parse("2x2").boxes(200, 100)
    assert boxes == [(0, 0, 100, 50), (100, 0, 200, 50), (0, 50, 100, 100), (100, 50, 200, 100)]


def test_captions_carry_tag_summary_and_scene_markers():
    caption = combine_captions(["a car at night ", "a bus"], tag="[BDD]", summary="2 driving scenes, night")
    assert caption == "[BDD] 2 driving scenes, night [SCENE-1] a car at night [SCENE-2] a bus"
    assert combine_captions(["x", "y", "z"]) == "[SCENE-1] x [SCENE-2] y [SCENE-3] z"


def test_mask_covers_exactly_the_chosen_panels_at_latent_resolution():
    layout = Layout.parse("2x2")
    width, height = 128, 64  # pixels; the latent grid is 16 x 8
    latent = panel_mask(layout, [2, 3], width // 8, height // 8)
    assert latent.shape == (8, 16)
    assert (latent[4:] == 1).all() and (latent[:4] == 0).all()
    one = panel_mask(layout, [1], width // 8, height // 8)
    expected = np.zeros((8, 16), np.float32)
    expected[:4, 8:] = 1
    assert np.array_equal(one, expected)
    three = panel_mask(Layout.parse("1x3"), [0, 2], 24, 8)
    assert three[:, :8].all() and not three[:, 8:16].any() and three[:, 16:].all()


def test_panel_outside_layout_is_named():
    with pytest.raises(CompositeError, match="panel 4 is outside layout 2x2 .panels are 0 to 3"):
        panel_mask(Layout.parse("2x2"), [2, 4], 16, 16)


def test_size_that_does_not_divide_is_named():
    with pytest.raises(CompositeError, match="x.png: a 101x100 composite does not divide into layout 2x2"):
        Layout.parse("2x2").check_size(101, 100, "x.png")
    with pytest.raises(CompositeError, match="multiple of 2 x 8"):
        Layout.parse("2x2").check_size(120, 64, "train.resolution", multiple=8)


def test_gradient_mask_ramps_inside_filled_panels_only():
    layout = Layout.parse("2x2")
    mask = gradient_mask(layout, [2, 3], 64, 64, gradient_width=8)
    assert (mask[:32] == 0).all()  # kept panels: untouched
    assert mask[32, 10] == pytest.approx(1 / 8) and mask[39, 10] == 1.0  # rises from the seam
    assert (mask[40:] == 1).all()
    # panels 2 and 3 are both filled: no ramp on the seam between them
    assert (mask[40:, 30:34] == 1).all()
    hard = gradient_mask(layout, [3], 64, 64, gradient_width=0)
    assert np.array_equal(hard, panel_mask(layout, [3], 64, 64))


def test_paste_keeps_unfilled_pixels_exactly():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    filled = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = gradient_mask(Layout.parse("2x2"), [3], 32, 32, gradient_width=4)
    out = np.asarray(paste_fill(original, filled, mask))
    keep = mask == 0
    assert np.array_equal(out[keep], np.asarray(original)[keep])
    assert np.array_equal(out[mask == 1], np.asarray(filled)[mask == 1])
    strip = side_by_side([original, original, original], gap=8)
    assert strip.size == (3 * 32 + 2 * 8, 32)


# --- the prepare source ---------------------------------------------------------------------


def _panel_folder(folder: Path, count: int, size=(48, 36)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _solid(COLOURS[i % len(COLOURS)], size).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"scene number {i}\n")
    return folder


def _prepare(tmp_path, **composites):
    config = PrepareConfig(source="composites", composites=composites, output=str(tmp_path / "data"), rows_per_shard=2)
    return prepare(config, Path)


def test_consecutive_groups_build_composites_shards_and_files(tmp_path):
    folder = _panel_folder(tmp_path / "panels", 9)
    (folder / "img04.txt").unlink()  # a missing caption: that image is left out and named
    report = _prepare(tmp_path, groups="consecutive", images=str(folder), layout="2x2", panel_size=[32, 24],
                      tag="[MOVIE-SHOTS]", summary="four shots")
    assert report["rows_written"] == 2 and report["skipped"] == {"missing caption": 1}
    assert "img04.png: missing caption (no img04.txt)" in report["skipped_items"]
    rows = pq.read_table(sorted((tmp_path / "data" / "shards").glob("*.parquet"))).to_pylist()
    assert [r["layout"] for r in rows] == ["2x2", "2x2"] and rows[0]["width"] == 64 and rows[0]["height"] == 48
    assert rows[1]["caption"] == ("[MOVIE-SHOTS] four shots [SCENE-1] scene number 5 [SCENE-2] scene number 6 "
                                  "[SCENE-3] scene number 7 [SCENE-4] scene number 8")
    built = tmp_path / "data" / "composites"
    assert (built / "composite-00001.txt").read_text().strip() == rows[1]["caption"]
    pixels = np.asarray(Image.open(built / "composite-00001.png"))
    assert (pixels[24:, 32:] == COLOURS[8 % len(COLOURS)]).all()  # panel 3 = the 4th image of the group
    index = [json.loads(l) for l in (tmp_path / "data" / "index_composites.jsonl").read_text().splitlines()]
    assert index[1]["panels"] == ["img05.png", "img06.png", "img07.png", "img08.png"]


def test_stride_overlaps_groups(tmp_path):
    folder = _panel_folder(tmp_path / "panels", 5)
    report = _prepare(tmp_path, groups="consecutive", images=str(folder), layout="1x3", stride=1, panel_size=[16, 16])
    assert report["rows_written"] == 3


def test_list_file_groups_and_bad_lines_are_named(tmp_path):
    folder = _panel_folder(tmp_path / "panels", 6)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("broken\n")
    (tmp_path / "groups.txt").write_text(
        "img00.png, img01.png, img02.png\n# a comment\nimg03.png, img04.png\nimg05.png, broken.png, img00.png\n"
    )
    report = _prepare(tmp_path, groups="list", list_file=str(tmp_path / "groups.txt"), images=str(folder),
                      layout="3x1", panel_size=[16, 16])  # fmt: skip
    assert report["rows_written"] == 1
    assert report["skipped"] == {"2 files for layout 3x1, which takes 3": 1, "corrupt image": 1}
    assert any(item.startswith("groups.txt line 3: 2 files") for item in report["skipped_items"])


def test_bdd_frames_grouped_by_attribute(bdd_dir, tmp_path):
    bdd = {"images": str(bdd_dir / "images"), "labels": [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))]}
    report = _prepare(tmp_path, groups="bdd", bdd=bdd, group_by="timeofday", layout="2x2", stride=1,
                      panel_size=[64, 36], tag="[BDD]")  # fmt: skip
    assert report["rows_written"] > 0
    assert report["skipped"]["no label record with a timeofday"] >= 1  # mask-only frames and the corrupt file
    rows = pq.read_table(sorted((tmp_path / "data" / "shards").glob("*.parquet"))).to_pylist()
    for row in rows:
        caption = row["caption"]
        assert caption.startswith("[BDD] 4 driving scenes, ") and caption.count("[SCENE-") == 4
        value = caption.removeprefix("[BDD] 4 driving scenes, ").split(" [SCENE-1]")[0]
        phrase = TIME_PHRASES[value]
        assert caption.count(f", {phrase}") == 4  # every panel's own caption names the shared time of day
        assert (row["width"], row["height"], row["source"]) == (128, 72, "composites:bdd")


def test_existing_composites_are_taken_as_they_are_and_bad_ones_named(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    make_composite([_solid(c, (8, 8)) for c in COLOURS[:4]], Layout.parse("2x2"), (20, 20)).save(folder / "good.png")
    (folder / "good.txt").write_text("[MOVIE-SHOTS] x [SCENE-1] a [SCENE-2] b [SCENE-3] c [SCENE-4] d\n")
    _solid((1, 2, 3), (41, 40)).save(folder / "odd.png")
    (folder / "odd.txt").write_text("odd\n")
    _solid((1, 2, 3), (40, 40)).save(folder / "nocaption.png")
    report = _prepare(tmp_path, groups="existing", images=str(folder), layout="2x2")
    assert report["rows_written"] == 1
    assert report["skipped"] == {"missing caption": 1, "a 41x40 composite does not divide into layout 2x2": 1}
    assert "nocaption.png: missing caption (no nocaption.txt)" in report["skipped_items"]
    row = pq.read_table(sorted((tmp_path / "data" / "shards").glob("*.parquet"))).to_pylist()[0]
    assert row["image"] == (folder / "good.png").read_bytes() and row["layout"] == "2x2"
    assert row["caption"].startswith("[MOVIE-SHOTS] x [SCENE-1]")


def test_nothing_usable_fails_and_keeps_earlier_output(tmp_path):
    folder = _panel_folder(tmp_path / "panels", 4)
    _prepare(tmp_path, groups="consecutive", images=str(folder), layout="2x2", panel_size=[16, 16])
    before = (tmp_path / "data" / "composites" / "composite-00000.png").read_bytes()
    for txt in folder.glob("*.txt"):
        txt.unlink()
    with pytest.raises(NothingUsable, match="no usable rows"):
        _prepare(tmp_path, groups="consecutive", images=str(folder), layout="2x2", panel_size=[16, 16])
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["skipped"] == {"missing caption": 4}
    assert not list(tmp_path.glob("data/.*.tmp-*"))
    # the failed rerun left the earlier run's composites and shards in place
    assert (tmp_path / "data" / "composites" / "composite-00000.png").read_bytes() == before
    assert len(list((tmp_path / "data" / "shards").glob("shard-*.parquet"))) == 1


def test_config_names_the_missing_input():
    from diffplat.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="prepare.composites.*groups: list needs `list_file`"):
        parse_config({"name": "t", "prepare": {"source": "composites", "composites": {"groups": "list"}}})
    with pytest.raises(ConfigError, match="prepare.composites.layout"):
        parse_config({"name": "t", "prepare": {"source": "composites", "composites": {"images": "x", "layout": "2-2"}}})
    with pytest.raises(ConfigError, match="source: composites needs a `composites` section"):
        parse_config({"name": "t", "prepare": {"source": "composites"}})


def test_panels_of_unequal_height_end_where_their_sizes_put_them():
    """The paper's movie shots: frames 480, 460 and 423 px tall, given in pixels or as proportions."""
    layout = Layout.parse("3x1").sized([480, 460, 423])
    assert [b[1:4:2] for b in layout.boxes(1080, 1363)] == [(0, 480), (480, 940), (940, 1363)]
    assert layout.boxes(108, 136) == [(0, 0, 108, 48), (0, 48, 108, 94), (0, 94, 108, 136)]  # scaled
    layout.check_size(108, 137, "x.png")  # sized rows need not divide the height
    mask = panel_mask(layout, [2], 108, 136)
    assert mask[:94].sum() == 0 and mask[94:].min() == 1
    wide = Layout.parse("1x3").sized(widths=[1, 2, 1])
    assert [b[0:3:2] for b in wide.boxes(40, 8)] == [(0, 10), (10, 30), (30, 40)]
    with pytest.raises(CompositeError, match="panel_heights gives 2 sizes for layout 3x1's 3"):
        Layout.parse("3x1").sized([1, 2], where="--panel_heights")
    with pytest.raises(CompositeError, match="must be positive numbers"):
        Layout.parse("3x1").sized([1, 0, float("nan")])
    with pytest.raises(CompositeError, match="leaves a panel of layout 3x1 no pixels"):
        Layout.parse("3x1").sized([100, 1, 100]).check_size(8, 20, "x.png")
