"""The labelled grid that assembles a guidance sweep into one comparable picture."""

import pytest
import torch

from ip2p_nodes.pipeline_core.errors import InputError
from ip2p_nodes.pipeline_core.grid import grid_shape, labelled_grid, split_labels


def _batch(count: int, height: int = 24, width: int = 32) -> torch.Tensor:
    """Distinct mid-grey-ish images, so each cell can be recognised and none is pure white or black."""
    values = torch.linspace(0.2, 0.8, count)
    images = values[:, None, None, None].expand(count, height, width, 3).clone()
    images[:, 0, 0, 0] = torch.arange(count) / 100.0  # a per-image fingerprint pixel
    return images


def test_every_image_lands_unchanged_in_its_cell_row_by_row():
    images = _batch(5)
    grid = labelled_grid(images, columns=3, gap=2)[0]
    assert grid.shape == (2 * 24 + 2, 3 * 32 + 2 * 2, 3)
    for index in range(5):
        row, column = divmod(index, 3)
        y, x = row * (24 + 2), column * (32 + 2)
        assert torch.equal(grid[y : y + 24, x : x + 32], images[index])
    # The unused sixth cell and the gaps are white.
    assert torch.all(grid[26:, 2 * 34 :] == 1.0)
    assert torch.all(grid[:, 32:34] == 1.0)


def test_automatic_columns_make_a_near_square_grid():
    assert grid_shape(18) == (5, 4)
    assert grid_shape(9) == (3, 3)
    assert grid_shape(1) == (1, 1)
    assert grid_shape(2, columns=10) == (2, 1)  # never wider than the batch
    assert grid_shape(18, columns=3) == (3, 6)


def test_each_caption_is_drawn_below_its_own_image_only():
    images = _batch(2, height=40, width=160)
    grid = labelled_grid(images, "\nseed 42 · text 7.5 · image 1.5", columns=2, gap=0)[0]
    assert grid.shape[0] > 40  # a caption strip was added
    strip_1, strip_2 = grid[40:, :160], grid[40:, 160:]
    assert torch.all(strip_1 == 1.0), "an empty label line must leave its strip blank"
    assert strip_2.min() < 0.3, "the second caption's text is missing"
    assert torch.equal(grid[:40, :160], images[0]) and torch.equal(grid[:40, 160:], images[1])


def test_different_labels_give_different_captions():
    images = _batch(2, height=32, width=200)
    grid = labelled_grid(images, "seed 1 · text 5\nseed 2 · text 10", columns=2, gap=0)[0]
    assert not torch.equal(grid[32:, :200], grid[32:, 200:])


def test_without_labels_the_grid_has_no_caption_strips():
    images = _batch(4)
    assert labelled_grid(images, None, gap=0).shape == (1, 48, 64, 3)
    assert labelled_grid(images, "  \n", gap=0).shape == (1, 48, 64, 3)


def test_a_long_caption_wraps_to_stay_inside_its_cell():
    images = _batch(2, height=16, width=64)
    short = labelled_grid(images, "a\nb", columns=2, gap=8, font_size=12)[0]
    long = labelled_grid(images, "seed 42 · text 7.5 · image 1.5\nb", columns=2, gap=8, font_size=12)[0]
    assert long.shape[0] > short.shape[0], "wrapped lines need a taller strip"
    assert torch.all(long[:, 64:72] == 1.0), "caption ink spilled into the gap between cells"


def test_a_label_count_that_does_not_match_the_images_is_refused_with_both_counts():
    with pytest.raises(InputError, match=r"3 line\(s\) for 2 image\(s\)"):
        labelled_grid(_batch(2), "a\nb\nc")
    assert split_labels("a\nb\n", 2) == ["a", "b"]  # the sampler's trailing newline is not a line


def test_bad_layout_values_are_refused_with_what_to_use():
    with pytest.raises(InputError, match="columns"):
        labelled_grid(_batch(2), columns=-1)
    with pytest.raises(InputError, match="gap"):
        labelled_grid(_batch(2), gap=-3)
    with pytest.raises(InputError, match=r"\[B, H, W, C\]"):
        labelled_grid(torch.zeros(8, 8, 3))


def test_rgba_batches_keep_their_channels():
    images = torch.full((2, 8, 8, 4), 0.5)
    assert labelled_grid(images, "x\ny", font_size=8).shape[-1] == 4
