"""Train-time augmentation: every output is a flip or a padded crop of its input, and the draws are
a pure function of (seed, step, position) (vectorized training sees the same: test_vectorized)."""

import pytest
import torch
from torch.nn import functional as F

from clients.augment import PAD, augment, draw_keys
from fedsim.config import load_config
from fedsim.errors import ConfigError


def images(n=64, seed=0):
    return torch.rand(n, 3, 10, 12, generator=torch.Generator().manual_seed(seed))


def test_flip_gives_the_image_or_its_mirror_both_about_half_the_time():
    x = images()
    out = augment(x, draw_keys(torch.tensor(5), 0, len(x)), ["flip"])
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 < int(mirrored.sum()) < 48


def test_each_crop_is_a_window_of_the_zero_padded_image():
    x = images()
    out = augment(x, draw_keys(torch.tensor(9), 3, len(x)), ["crop"])
    assert out.shape == x.shape
    padded = F.pad(x, (PAD,) * 4)
    offsets = set()
    for i in range(len(x)):  # brute force over every window position
        hits = [(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
                if torch.equal(padded[i, :, dy:dy + 10, dx:dx + 12], out[i])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 20  # the windows are spread over the 81 positions


def test_draws_depend_on_seed_step_and_position_only():
    keys = draw_keys(torch.tensor([3, 4]), 7, 5)
    assert keys.shape == (2, 5)
    torch.testing.assert_close(keys[1], draw_keys(torch.tensor(4), 7, 5))
    assert not torch.equal(keys[0], keys[1])
    assert not torch.equal(draw_keys(torch.tensor(3), 8, 5), keys[0])
    torch.testing.assert_close(draw_keys(torch.tensor(3), 7, 3), keys[0, :3])  # short batches: a prefix


def test_augmenting_non_images_is_refused(tmp_path):
    from fedsim.runner import run_experiment

    config = load_config(None, ["data.embedding=identity", "client.augment=['flip']",  # flat inputs
                                "engine.backend=inprocess", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="client.augment .* needs images"):
        run_experiment(config)


def test_cutout_zeroes_one_square_around_a_random_centre():
    images = torch.ones(64, 1, 28, 28)
    keys = draw_keys(torch.tensor(5), 0, 64)
    out = augment(images, keys, ["cutout"])
    centres = set()
    for image in out[:, 0]:
        rows, cols = torch.nonzero(image == 0, as_tuple=True)
        height = int(rows.max() - rows.min()) + 1
        width = int(cols.max() - cols.min()) + 1
        assert len(rows) == height * width  # one rectangle, clipped at the border
        assert height <= 15 and width <= 15
        assert (height == 15 or rows.min() == 0 or rows.max() == 27)
        centres.add((int(rows.float().mean()), int(cols.float().mean())))
    assert len(centres) > 30  # the centres vary with the key
    torch.testing.assert_close(augment(images, keys, ["cutout"]), out)  # a pure function of the keys
