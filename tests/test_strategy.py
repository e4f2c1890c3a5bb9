"""The coordinator averages only well-formed updates, weighted by patients, naming rejected sites."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.strategy import PatientFedAvg
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.params import PACKED, pack, unpack

W = {"w": (2,)}  # the test model's layout: one parameter of 2 values


def packed(w: np.ndarray) -> object:
    """A 2-value update as a site sends it (one float32 vector; the dtype is kept as given)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({PACKED: Array(np.ascontiguousarray(w).reshape(-1))})


def values(record: object) -> dict[str, np.ndarray]:
    return unpack(record, W, what="the average")  # type: ignore[arg-type]


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def reply(site: str, w: np.ndarray, patients: float) -> Message:
    content = RecordDict({
        P.ARRAYS: packed(w.astype(np.float32)),
        P.METRICS: MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.5}),
        P.SITE: ConfigRecord({P.SITE_NAME: site}),
    })
    return Message(content=content, dst_node_id=1, message_type="train")


def strategy() -> PatientFedAvg:
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)
    s.expected = W
    return s


def test_average_is_weighted_by_patients() -> None:
    arrays, metrics = strategy().aggregate_train(1, [reply("a", np.array([1.0, 1.0]), 10), reply("b", np.array([4.0, 4.0]), 30)])
    np.testing.assert_allclose(values(arrays)["w"], [3.25, 3.25])
    assert metrics[M.NUM_PATIENTS] == 40


@pytest.mark.parametrize(("bad", "why"), [
    (np.array([np.nan, 1.0]), "NaN"),
    (np.array([1.0, 1.0, 1.0]), "The update of site evil holds 3 values; the plan's model has 2"),
    (np.array([1e9, 0.0]), "range"),
])
def test_malformed_updates_are_rejected_with_the_site_named(bad: np.ndarray, why: str) -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("good", np.array([2.0, 2.0]), 10), reply("evil", bad, 10)])
    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])  # only the good site counted
    evil = next(r for r in s.log[1].train if r.site == "evil")
    assert evil.error and "update rejected by the coordinator" in evil.error and why in evil.error


def test_a_non_positive_weight_is_rejected() -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("zero", np.array([2.0, 2.0]), 0)])
    assert arrays is None
    assert "must be a positive number" in s.log[1].train[0].error


def bare(site: str | None, **records: object) -> Message:
    content = RecordDict({k: v for k, v in records.items()})  # type: ignore[misc]
    if site is not None:
        content[P.SITE] = ConfigRecord({P.SITE_NAME: site})
    return Message(content=content, dst_node_id=1, message_type="train")


def malformed(case: str) -> Message:
    w = packed(np.ones(2, np.float32))
    n = MetricRecord({M.NUM_PATIENTS: 10.0})
    return {
        "no-arrays": lambda: bare("evil", **{P.METRICS: n}),
        "metrics-wrong-type": lambda: bare("evil", **{P.ARRAYS: w, P.METRICS: ConfigRecord({M.NUM_PATIENTS: 10.0})}),
        "metric-is-a-list": lambda: bare("evil", **{P.ARRAYS: w, P.METRICS: MetricRecord({M.NUM_PATIENTS: [1.0, 2.0]})}),
        "extra-record": lambda: bare("evil", **{P.ARRAYS: w, P.METRICS: n, "features": ConfigRecord({"x": 1})}),
        "integer-weights": lambda: bare("evil", **{P.ARRAYS: packed(np.ones(2, np.int32)), P.METRICS: n}),
        "float64-weights": lambda: bare("evil", **{P.ARRAYS: packed(np.ones(2, np.float64)), P.METRICS: n}),
        "one-array-per-parameter": lambda: bare("evil", **{P.ARRAYS: ArrayRecord({"w": Array(np.ones(2, np.float32))}), P.METRICS: n}),
        "two-arrays": lambda: bare("evil", **{P.ARRAYS: ArrayRecord({PACKED: Array(np.ones(2, np.float32)), "x": Array(np.ones(1, np.float32))}), P.METRICS: n}),
        "matrix": lambda: bare("evil", **{P.ARRAYS: ArrayRecord({PACKED: Array(np.ones((1, 2), np.float32))}), P.METRICS: n}),
    }[case]()


@pytest.mark.parametrize(("case", "why"), [
    ("no-arrays", "neither a refusal nor the record(s) ['arrays']"),
    ("metrics-wrong-type", "record 'metrics' is a ConfigRecord"),
    ("metric-is-a-list", "metric 'num-patients' is a list"),
    ("extra-record", "unexpected record(s) ['features']"),
    ("integer-weights", "The update of site evil is a int32 array of shape (2,); a packed model is one float32 vector"),
    ("float64-weights", "The update of site evil is a float64 array"),
    ("one-array-per-parameter", "The update of site evil holds the arrays ['w']; a packed model is one array named 'model'"),
    ("two-arrays", "holds the arrays ['model', 'x']"),
    ("matrix", "The update of site evil is a float32 array of shape (1, 2)"),
])
def test_malformed_replies_are_rejected_with_the_site_named(case: str, why: str) -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("good", np.array([2.0, 2.0]), 10), malformed(case)])
    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])
    evil = next(r for r in s.log[1].train if r.site == "evil")
    assert evil.error and why in evil.error and not evil.metrics


def test_a_reply_without_a_site_record_is_rejected_and_named_by_node() -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [bare(None, **{P.ARRAYS: packed(np.ones(2, np.float32)), P.METRICS: MetricRecord({M.NUM_PATIENTS: 1.0})})])
    assert arrays is None
    assert s.log[1].train[0].site.startswith("node-") and "no 'site' record" in s.log[1].train[0].error


def test_a_crashed_or_silent_site_is_named_from_its_earlier_replies() -> None:
    from flwr.app import Error

    s = strategy()
    first = reply("alpha", np.array([1.0, 1.0]), 10)
    first.metadata.__dict__["_src_node_id"] = 7
    s.aggregate_train(1, [first])
    crashed = Message(Error(code=0, reason="\x1b[36mray::Actor\x1b[39m\n  File x.py\nClientAppException occurred. Message: boom'>"), reply_to=first)
    crashed.metadata.__dict__["_src_node_id"] = 7
    s.aggregate_train(2, [crashed])
    report = s.log[2].train[0]
    assert report.site == "alpha" and report.error.endswith("Message: boom") and "File x.py" not in report.error
    s._sent[(3, "train")] = [7]
    s.aggregate_train(3, [])
    assert s.log[3].train[0].site == "alpha" and "no reply within `federation.round_timeout_s`" in s.log[3].train[0].error


def test_the_average_is_bit_for_bit_what_flowers_aggregation_gives() -> None:
    # Arrange: three sites with a realistic mix of shapes and weights (patients are whole numbers)
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    names = {"conv.weight": (16, 1, 3, 3), "head.weight": (1, 32), "head.bias": (1,)}
    replies, per_parameter = [], []
    for site, patients in (("a", 17), ("b", 9), ("c", 23.0)):
        update = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in names.items()}
        metrics = MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.5})
        content = RecordDict({P.ARRAYS: pack(update, names), P.METRICS: metrics, P.SITE: ConfigRecord({P.SITE_NAME: site})})
        replies.append(Message(content=content, dst_node_id=1, message_type="train"))
        per_parameter.append(RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}), P.METRICS: metrics}))
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)
    s.expected = names

    # Act
    ours, _ = s.aggregate_train(1, replies)
    flowers_packed = aggregate_arrayrecords([m.content for m in replies], M.NUM_PATIENTS)
    flowers_per_parameter = aggregate_arrayrecords(per_parameter, M.NUM_PATIENTS)  # the wire format before packing

    # Assert: the same bits as Flower's average of the packed vectors and of the separate arrays
    assert ours is not None and list(ours) == list(flowers_packed) == [PACKED]
    assert ours[PACKED].numpy().tobytes() == flowers_packed[PACKED].numpy().tobytes()
    for name, value in unpack(ours, names, what="the average").items():
        b = flowers_per_parameter[name].numpy()
        assert value.dtype == b.dtype and value.tobytes() == b.tobytes()


def test_an_update_that_cannot_be_decoded_is_rejected_with_the_site_named() -> None:
    s = strategy()
    broken = reply("broken", np.array([2.0, 2.0]), 10)
    broken.content[P.ARRAYS] = ArrayRecord({PACKED: Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not npy")})

    arrays, _ = s.aggregate_train(1, [reply("good", np.array([2.0, 2.0]), 10), broken])

    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])
    assert "cannot be decoded" in next(r for r in s.log[1].train if r.site == "broken").error


class ShrinkingGrid:
    """A Grid whose connected nodes are ``first`` on the first look and ``later`` ever after (a
    site that crashed or left right after the coordinator saw it)."""

    def __init__(self, first: list[int], later: list[int]) -> None:
        self.first, self.later, self.looks = first, later, 0

    def get_node_ids(self) -> list[int]:
        self.looks += 1
        return list(self.first if self.looks == 1 else self.later)


def sites_asked(msgs: object) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in msgs)  # type: ignore[attr-defined]


def test_a_site_leaving_after_the_node_check_does_not_hang_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: Flower's sample_nodes would look again, see 2 of 3 and sleep(1) with no deadline
    from flwr.serverapp.strategy import strategy_utils

    def flowers_unbounded_wait(_: float) -> None:
        raise AssertionError("Flower's sample_nodes waited for nodes (it has no deadline)")

    monkeypatch.setattr(strategy_utils, "sleep", flowers_unbounded_wait)
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=3, node_wait_timeout_s=0.2)

    # Act
    train = s.configure_train(1, ArrayRecord(), ConfigRecord(), ShrinkingGrid([1, 2, 3], [1, 2]))  # type: ignore[arg-type]
    evaluate = s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), ShrinkingGrid([1, 2], [1, 2]))  # type: ignore[arg-type]

    # Assert: training asks the three sites it saw (the one gone is reported silent); the trained
    # round's model is evaluated by the two still there once node_wait_timeout_s has passed
    assert sites_asked(train) == [1, 2, 3] and s._sent[(1, "train")] == [m.metadata.dst_node_id for m in train]
    assert sites_asked(evaluate) == [1, 2]
    assert all(m.content[P.CONFIG][P.SERVER_ROUND] == 1 for m in [*train, *evaluate])


def test_a_round_without_min_nodes_is_not_started_and_says_how_to_continue() -> None:
    from shared.errors import FederationError

    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=3, node_wait_timeout_s=0.1)
    with pytest.raises(FederationError, match=r"Round 4 was not started: Only 1 of the 3 sites .*`fedrelapse run --resume"):
        s.configure_train(4, ArrayRecord(), ConfigRecord(), ShrinkingGrid([1], [1]))  # type: ignore[arg-type]


def test_sites_are_sampled_as_flowers_sample_nodes_draws_them() -> None:
    # Arrange: ten connected sites, half asked each round
    import random

    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    grid = ShrinkingGrid(list(range(1, 11)), list(range(1, 11)))
    s = PatientFedAvg(fraction_train=0.5, fraction_evaluate=0.3, min_nodes=2, node_wait_timeout_s=1.0)

    # Act: the same seed of Python's random for ours and for Flower's
    random.seed(11)
    ours = [m.metadata.dst_node_id for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)]  # type: ignore[arg-type]
    ours_eval = [m.metadata.dst_node_id for m in s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)]  # type: ignore[arg-type]
    random.seed(11)
    flowers = sample_nodes(grid, 2, 5)[0]  # type: ignore[arg-type]
    flowers_eval = sample_nodes(grid, 2, 3)[0]  # type: ignore[arg-type]

    # Assert: the same sites in the same order, so seeded runs sample as before
    assert ours == flowers and ours_eval == flowers_eval and len(set(ours)) == 5
