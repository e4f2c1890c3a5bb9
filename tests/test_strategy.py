"""The coordinator averages only well-formed updates, weighted by patients, naming rejected sites."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from server.strategy import PatientFedAvg
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.params import from_record, to_record


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(site: str, w: np.ndarray, patients: float) -> Message:
    content = RecordDict({
        P.ARRAYS: to_record({"w": w.astype(np.float32)}),
        P.METRICS: MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.5}),
        P.SITE: ConfigRecord({P.SITE_NAME: site}),
    })
    return Message(content=content, dst_node_id=1, message_type="train")


def strategy() -> PatientFedAvg:
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)
    s.expected = {"w": (2,)}
    return s


def test_average_is_weighted_by_patients() -> None:
    arrays, metrics = strategy().aggregate_train(1, [reply("a", np.array([1.0, 1.0]), 10), reply("b", np.array([4.0, 4.0]), 30)])
    np.testing.assert_allclose(from_record(arrays)["w"], [3.25, 3.25])
    assert metrics[M.NUM_PATIENTS] == 40


@pytest.mark.parametrize(("bad", "why"), [
    (np.array([np.nan, 1.0]), "NaN"),
    (np.array([1.0, 1.0, 1.0]), "shape"),
    (np.array([1e9, 0.0]), "range"),
])
def test_malformed_updates_are_rejected_with_the_site_named(bad: np.ndarray, why: str) -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("good", np.array([2.0, 2.0]), 10), reply("evil", bad, 10)])
    np.testing.assert_allclose(from_record(arrays)["w"], [2.0, 2.0])  # only the good site counted
    evil = next(r for r in s.log[1].train if r.site == "evil")
    assert evil.error and "update rejected by the coordinator" in evil.error and why in evil.error


def test_a_non_positive_weight_is_rejected() -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("zero", np.array([2.0, 2.0]), 0)])
    assert arrays is None
    assert "must be a positive number" in s.log[1].train[0].error
