"""Image batches: resumable shuffled training batches and in-order evaluation batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.data.images import ImageBatches, image_eval_batches
from moekit.errors import MoekitError

# --- batches ----------------------------------------------------------------------------------------------------


def _toy(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2)
    return images, np.arange(n, dtype=np.int64)


def test_image_batches_resume_exactly_and_shuffle_per_epoch():
    images, labels = _toy(50)  # 3 batches of 16 per epoch; the ragged 2 are dropped
    run = ImageBatches(images, labels, batch_size=16, seed=7)
    uninterrupted = [run.next_batch() for _ in range(10)]
    for x, y in uninterrupted:
        assert x.shape == (16, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x[:, 0, 0, 0], y.float() * 4)  # each image stays with its label
    epoch0 = torch.cat([y for _, y in uninterrupted[:3]]).numpy()
    np.testing.assert_array_equal(epoch0, np.random.default_rng([7, 0]).permutation(50)[:48])
    epoch1 = torch.cat([y for _, y in uninterrupted[3:6]]).numpy()
    assert len(set(epoch1.tolist())) == 48 and not np.array_equal(epoch0, epoch1)

    first = ImageBatches(images, labels, batch_size=16, seed=7)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    assert state == {"epoch": 1, "index": 16}
    resumed = ImageBatches(torch.from_numpy(images), torch.from_numpy(labels), batch_size=16, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(6)), uninterrupted[4:], strict=True):
        torch.testing.assert_close(x, ex)
        torch.testing.assert_close(y, ey)
    other_seed = ImageBatches(images, labels, batch_size=16, seed=8).next_batch()[1]
    assert not torch.equal(other_seed, uninterrupted[0][1])


def test_image_batches_refuse_a_batch_larger_than_the_data():
    images, labels = _toy(10)
    with pytest.raises(MoekitError, match="10 images, fewer than train.batch_size=11"):
        ImageBatches(images, labels, batch_size=11, seed=0)
    with pytest.raises(MoekitError, match="10 images but 9 labels"):
        ImageBatches(images, labels[:9], batch_size=2, seed=0)


def test_image_eval_batches_are_in_order_with_a_short_last_batch():
    images, labels = _toy(10)
    batches = list(image_eval_batches(images, labels, batch_size=4))
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    torch.testing.assert_close(batches[2][0], torch.from_numpy(images[8:]))
    capped = list(image_eval_batches(images, labels, batch_size=4, max_batches=2))
    assert [len(y) for _, y in capped] == [4, 4]
