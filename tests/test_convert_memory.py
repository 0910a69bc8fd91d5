"""Streaming: converting a deeper Meta checkpoint of the same width must not raise peak memory by more than two
layers' bytes (acceptance: 32-layer peak <= 4-layer peak + two layers; this CI-sized version compares 2 and 10
layers at dim 1024; experiments/bench_convert.py runs the full 4 vs 32 layers at dim 2048)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from bench_convert import layer_bytes, make_meta_checkpoint, measure_conversion, meta_params  # noqa: E402


def test_peak_rss_independent_of_depth(tmp_path):
    peaks = {}
    for n in (2, 10):
        params = meta_params(1024, n, 8192)
        size = make_meta_checkpoint(str(tmp_path / f"m{n}"), params, shards=2)
        peaks[n] = measure_conversion(str(tmp_path / f"m{n}"), str(tmp_path / f"o{n}"))["peak_rss"]
        assert os.path.isfile(tmp_path / f"o{n}" / "config.json")
    two_layers = 2 * layer_bytes(params)
    print(
        f"peak RSS 2 layers {peaks[2] / 1e6:.0f} MB, 10 layers {peaks[10] / 1e6:.0f} MB, "
        f"two layers {two_layers / 1e6:.0f} MB, 10-layer checkpoint {size / 1e6:.0f} MB"
    )
    assert peaks[10] <= peaks[2] + two_layers
