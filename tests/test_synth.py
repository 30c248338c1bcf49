"""Synthetic product photos are deterministic: calibration fingerprints, tests and datasets rely on it."""
from __future__ import annotations

import random

from shelfsight import synth


def test_same_seed_same_pixels_other_seed_other_pixels():
    def render(seed, variant):
        return synth.render(synth.make_product(random.Random(1)), seed=seed, variant=variant).tobytes()

    for variant in synth.VARIANTS:
        assert render(3, variant) == render(3, variant)
        assert render(3, variant) != render(4, variant)


def test_samples_are_reproducible():
    a, b = synth.samples(6, seed=9), synth.samples(6, seed=9)
    assert [(x[0].tobytes(), x[1], x[2]) for x in a] == [(y[0].tobytes(), y[1], y[2]) for y in b]
