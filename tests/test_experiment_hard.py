"""`tgpo-jax experiment hard` (issue 26): the per-iteration reward-signal metrics, the teacher
gradient share, the validation split, tuning on it, CI aggregation, and --quick end to end on a
reduced config."""

import numpy as np
import pytest

from tgpo_jax.train.iteration import group_reward_metrics


def test_group_reward_metrics_count_all_equal_groups():
    # 4 groups of 3: all zero, mixed, all one, all zero
    r = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0], np.float32)
    m = group_reward_metrics(r, 3)
    assert m == {"reward/all_equal_group_frac": pytest.approx(0.75), "reward/all_zero_group_frac": pytest.approx(0.5)}
    assert group_reward_metrics(r, 1) == {}
