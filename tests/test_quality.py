"""The demo's picture measures, on pictures whose answer is known (no model)."""

import numpy as np
from PIL import Image

from diffplat.data.bdd import colorize_mask
from diffplat.data.composites import Layout, make_composite
from diffplat.data.synthetic_bdd import _SKY, _draw_scene
from diffplat.evaluate.quality import colour_distance, map_agreement, panel_agreement, sky_colour


def _scene(time: str, seed: int = 0):
    image, mask, _, _ = _draw_scene(np.random.default_rng(seed), 128, 64, time)
    return image, Image.fromarray(colorize_mask(mask))


def test_sky_colour_reads_the_time_of_day():
    for time, colour in _SKY.items():
        image, _ = _scene(time)
        assert colour_distance(sky_colour(image), colour) < 25, time
    assert colour_distance(sky_colour(_scene("night")[0]), _SKY["daytime"]) > 200


def test_map_agreement_is_high_for_a_scene_and_its_map_and_low_for_noise():
    image, colour_map = _scene("daytime")
    assert map_agreement(image, colour_map) > 0.8  # not 1: buildings differ in shade, the lane line is road
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    assert map_agreement(noise, colour_map) < 0.05
    other_image, _ = _scene("daytime", seed=5)  # a scene, but not the one this map is of
    assert map_agreement(other_image, colour_map) < map_agreement(image, colour_map) - 0.2
    small = colour_map.resize((32, 16), Image.NEAREST)  # a map of another size is resized to the image
    assert 0 <= map_agreement(image, small) <= 1


def test_panel_agreement_is_small_when_every_panel_shares_the_time_of_day():
    day = [_scene("daytime", seed)[0] for seed in range(4)]
    mixed = day[:2] + [_scene("night", 7)[0], _scene("night", 8)[0]]
    layout = Layout.parse("2x2")
    assert panel_agreement(make_composite(day, layout, (128, 64)), "2x2", [2, 3]) < 25
    assert panel_agreement(make_composite(mixed, layout, (128, 64)), layout, [2, 3]) > 200


def test_the_demos_held_out_inputs_are_what_their_measures_assume(tmp_path):
    """quality.json's ControlNet and In-Context LoRA measures read held-out frames: each map with
    its own frame agrees (the ceiling a model is measured against), each composite's two frames
    share a time of day, and the times alternate so a short list still holds each."""
    import json

    from diffplat.data.synthetic_bdd import write_synthetic_bdd
    from diffplat.demo_quality import SIZE, detector_quality, held_out_composites, held_out_maps
    from diffplat.pictures import labelled_rows

    write_synthetic_bdd(tmp_path / "val", num_images=24, seed=1)
    maps = held_out_maps(tmp_path / "val", count=4)
    assert len(maps) == 4
    for colour_map, caption, real in maps:
        assert colour_map.size == real.size == SIZE and caption.startswith("a driving scene")
        assert map_agreement(real, colour_map) > 0.6
    size = (192, 48)  # the In-Context LoRA leg's: two frames side by side
    composites = held_out_composites(tmp_path / "val", size, count=20)
    assert len(composites) == 9  # 20 labelled frames: pairs sharing a time of day
    for composite, caption in composites:  # of the size given: the size the leg trained at, filled at
        assert composite.size == size and caption.startswith("[BDD] [SCENE-1]") and "[SCENE-2]" in caption
        assert panel_agreement(composite, "1x2", [1]) < 40
    skies = [sky_colour(c.crop((0, 0, size[0] // 2, size[1]))) for c, _ in composites[:3]]
    assert min(colour_distance(a, b) for i, a in enumerate(skies) for b in skies[i + 1:]) > 50
    sheet = labelled_rows([[m for m, _, _ in maps], [r for _, _, r in maps]], ["map", "real"], thumb_width=64)
    assert sheet.height == 2 * (32 + 8) and sheet.width > 4 * 64
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"variants": [{"name": "real", "map50_95": 0.1, "map50": 0.2},
                                               {"name": "real+kept", "map50_95": 0.15, "map50": 0.3}]}))
    measured = detector_quality(report)
    assert (measured["base"], measured["adapter"], measured["mix"]) == (0.1, 0.15, "real+kept")
