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
