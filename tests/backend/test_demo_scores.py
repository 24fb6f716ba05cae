"""A freshly seeded and trained demo project shows queue scores that tell its tiles apart
(issue 16: "every queued tile shows 0.997"): the demo as ``make run`` seeds it (same images, same
training options), trained, predicted and ranked by the worker's own code in this process."""
from __future__ import annotations

import pytest

from tests.load.demo_scores import train_demo

# transaction=True: the run's heartbeat thread writes through its own connection (an open test
# transaction would hold the SQLite write lock it waits for).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_fresh_demo_queue_spreads_its_scores(make_user, settings):
    make_user("root").__class__.objects.filter(username="root").update(is_superuser=True, is_staff=True)
    settings.CELERY_TASK_ALWAYS_EAGER = False
    [result] = train_demo(size=512, only=["Demo: synthetic Pap smear"])
    print(result)  # the figures, for the record
    assert result["verdict"] == "promoted" and result["score_key"] == "expected_fixes"
    queue = result["queue"]
    assert queue["n"] == 24  # 6 unlabelled images of 4 tiles
    # Not one value for every tile: the top tile is clearly apart from the median, and the middle
    # half of the queue spans a fifth of the median or more (measured: 3.26 and 0.76).
    assert queue["ratio"] >= 1.5 and queue["iqr_over_median"] >= 0.2, queue
    # More spread than the tile-mean pixel entropy the default strategy shows (measured 1.14).
    assert queue["ratio"] > result["by_score"]["entropy"]["ratio"], result["by_score"]
    # Whether the order follows the nuclei really to fix (Spearman against the held-out masks) is
    # printed, not asserted: on this under-trained Pap demo it is weak (0.25 measured; 0.41 before
    # the training-data change of issue 12), see docs/active_learning.md, "Demo scores".
    print("spearman with the true fixes:", result["spearman"])
