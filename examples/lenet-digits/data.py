"""A dataset of our own: scikit-learn's 8x8 digits placed at a random spot of a 12x12 canvas
(seeded), split 80/20. fedsim calls `shifted_digits(data_section, seed)` and partitions the
training arrays as the spec says."""

import numpy as np
from sklearn.datasets import load_digits


def shifted_digits(spec, seed):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = np.zeros((len(digits.images), 1, 12, 12), np.float32)
    for image, digit, (row, col) in zip(images, digits.images, rng.integers(0, 5, (len(images), 2)),
                                        strict=True):
        image[0, row:row + 8, col:col + 8] = digit / 16.0
    order = rng.permutation(len(images))
    test = order[: len(order) // 5]
    train = order[len(order) // 5:]
    return {"x_train": images[train], "y_train": digits.target[train],
            "x_test": images[test], "y_test": digits.target[test], "num_classes": 10}
