"""The coordinator averages only well-formed updates, weighted by patients, naming rejected sites."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.strategy import PatientFedAvg, scalar_metrics
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.params import PACKED, pack, unpack
from tests.conftest import error_of

W = {"w": (2,)}  # the test model's layout: one parameter of 2 values


def packed(w: np.ndarray) -> ArrayRecord:
    """A 2-value update as a site sends it (one float32 vector; the dtype is kept as given)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({PACKED: Array(np.ascontiguousarray(w).reshape(-1))})


def values(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None, "no average"
    return unpack(record, W, what="the average")


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def from_node(msg: Message, node: int) -> Message:
    """``msg`` as the reply of Flower node ``node``."""
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def node_of(site: str | None) -> int:
    """The node id a test site replies from: one per name (the coordinator pins names to nodes)."""
    return 100 + zlib.crc32((site or "").encode()) % 1_000_000


def reply(site: str, w: np.ndarray, patients: float) -> Message:
    content = RecordDict({
        P.ARRAYS: packed(w.astype(np.float32)),
        P.METRICS: MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.5}),
        P.SITE: ConfigRecord({P.SITE_NAME: site}),
    })
    return from_node(Message(content=content, dst_node_id=1, message_type="train"), node_of(site))


def strategy() -> PatientFedAvg:
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)
    s.expected = W
    return s


def test_average_is_weighted_by_patients() -> None:
    arrays, metrics = strategy().aggregate_train(1, [reply("a", np.array([1.0, 1.0]), 10), reply("b", np.array([4.0, 4.0]), 30)])
    np.testing.assert_allclose(values(arrays)["w"], [3.25, 3.25])
    assert metrics is not None and metrics[M.NUM_PATIENTS] == 40


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


@pytest.mark.parametrize("weight", [0, -3.0, 2.5, 1001.0, 1e12, 1e308, float("inf")])
def test_a_weight_that_is_not_a_whole_patient_count_up_to_max_weight_is_rejected(weight: float) -> None:
    # Arrange: an honest site, and one claiming an implausible number of patients (max_weight 1000)
    s = strategy()

    # Act
    arrays, metrics = s.aggregate_train(1, [reply("good", np.array([2.0, 2.0]), 10), reply("big", np.array([9999.0, 9999.0]), weight)])

    # Assert: the claim does not outweigh the honest update; the site is named with the field
    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])
    assert metrics is not None and metrics[M.NUM_PATIENTS] == 10
    big = next(r for r in s.log[1].train if r.site == "big")
    assert "whole number of training patients from 1 to 1000 (`federation.secure_aggregation.max_weight`)" in error_of(big)


def test_two_sites_at_the_weight_cap_average_normally_and_an_overflowing_total_is_refused() -> None:
    from server.strategy import weighted_average

    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("a", np.array([1.0, 1.0]), 1000), reply("b", np.array([3.0, 3.0]), 1000)])
    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])
    with pytest.raises(ValueError, match="finite positive number"):
        weighted_average([(1e308, np.ones(2, np.float32)), (1e308, np.ones(2, np.float32))])


def dp_reply(site: str, **changes: float | None) -> Message:
    """A DP train reply with plausible privacy figures, then ``changes`` (None: key removed)."""
    msg = reply(site, np.array([2.0, 2.0]), 10)
    figures = {M.EPSILON_RUN: 1.0, M.EPSILON_TOTAL: 3.0, M.DELTA: 1e-5, M.NOISE_MULTIPLIER: 1.1}
    for key, value in {**figures, **changes}.items():
        if value is not None:
            msg.content.metric_records[P.METRICS][key] = value
    return msg


@pytest.mark.parametrize(("changes", "why"), [
    ({M.DELTA: None}, "privacy figure(s) ['delta'] missing"),
    ({M.NOISE_MULTIPLIER: None}, "privacy figure(s) ['noise-multiplier'] missing"),
    ({M.EPSILON_TOTAL: None, M.DELTA: None}, "['epsilon-total', 'delta'] missing"),
    ({M.EPSILON_RUN: float("inf")}, "metric 'epsilon-run' is inf; in a DP run ε must be finite and ≥ 0"),
    ({M.EPSILON_RUN: -5.0}, "metric 'epsilon-run' is -5.0"),
    ({M.EPSILON_TOTAL: 0.5}, "metric 'epsilon-total' (0.5) is below 'epsilon-run' (1.0)"),
    ({M.DELTA: 0.0}, "metric 'delta' is 0.0; δ must lie strictly between 0 and 1"),
    ({M.DELTA: 1.0}, "metric 'delta' is 1.0"),
    ({M.NOISE_MULTIPLIER: -1.0}, "metric 'noise-multiplier' is -1.0; σ must be finite and > 0"),
    ({M.NOISE_MULTIPLIER: 0.0}, "metric 'noise-multiplier' is 0.0"),
    ({M.TRAIN_LOSS: float("inf")}, "metric 'train-loss' is inf; it must be finite and ≥ 0"),
    ({M.TRAIN_LOSS: -1.0}, "metric 'train-loss' is -1.0"),
])
def test_implausible_privacy_figures_make_a_dp_reply_malformed(changes: dict[str, float | None], why: str) -> None:
    s = strategy()

    arrays, _ = s.aggregate_train(1, [dp_reply("good"), dp_reply("liar", **changes)])

    np.testing.assert_allclose(values(arrays)["w"], [2.0, 2.0])
    liar = next(r for r in s.log[1].train if r.site == "liar")
    assert liar.error == f"malformed reply rejected by the coordinator: {error_of(liar).split(': ', 1)[1]}" and why in error_of(liar)
    assert liar.metrics == {}
    good = next(r for r in s.log[1].train if r.site == "good")
    assert good.error is None and good.metrics[M.EPSILON_RUN] == 1.0


def test_privacy_figures_are_checked_on_a_refusal_and_only_in_dp_runs() -> None:
    # A replay refusal sends all four figures; one that sends ε without δ is malformed too.
    s = strategy()
    refusal = dp_reply("replayer", **{M.DELTA: None})
    del refusal.content[P.ARRAYS]
    refusal.content.config_records[P.SITE][P.REFUSAL_CODE] = "replay"
    s.aggregate_train(1, [dp_reply("good"), refusal])
    assert "privacy figure(s) ['delta'] missing" in error_of(next(r for r in s.log[1].train if r.site == "replayer"))
    # A non-private plan: the site's figures of a non-private run (ε ∞, δ 0, σ 0) are what it should send.
    plain = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0, private=False)
    plain.expected = W
    arrays, _ = plain.aggregate_train(1, [dp_reply("np", **{M.EPSILON_RUN: float("inf"), M.EPSILON_TOTAL: float("inf"), M.DELTA: 0.0, M.NOISE_MULTIPLIER: 0.0})])
    assert arrays is not None and plain.log[1].train[0].error is None


def test_epsilon_total_may_fall_short_of_epsilon_run_by_float_rounding_only() -> None:
    s = strategy()
    arrays, _ = s.aggregate_train(1, [dp_reply("a", **{M.EPSILON_RUN: 2.0, M.EPSILON_TOTAL: 2.0 * (1 - 1e-9)})])
    assert arrays is not None and s.log[1].train[0].error is None


def eval_reply(site: str, metrics: Mapping[str, float]) -> Message:
    content = RecordDict({P.METRICS: MetricRecord(dict(metrics)), P.SITE: ConfigRecord({P.SITE_NAME: site})})
    return from_node(Message(content=content, dst_node_id=1, message_type="evaluate"), node_of(site))


GOOD_EVAL = {M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 10.0, M.AUROC: 0.7, M.AUPRC: 0.5, M.EVAL_LOSS: 0.6}


@pytest.mark.parametrize(("changes", "why"), [
    ({M.AUROC: 7.0, M.NUM_PATIENTS: 1000.0}, "metric 'auroc' is 7.0; it must lie in [0, 1]"),
    ({M.AUPRC: -3.0}, "metric 'auprc' is -3.0"),
    ({M.EVAL_LOSS: float("inf")}, "metric 'eval-loss' is inf"),
    ({M.EVAL_LOSS: -0.1}, "metric 'eval-loss' is -0.1"),
    ({M.NUM_PATIENTS: 1.0, M.AUROC: 1.0}, "metric 'num-patients' is 1.0; it must be a whole number of patients from 5 to 1000"),
    ({M.NUM_PATIENTS: float("inf")}, "metric 'num-patients' is inf"),
    ({M.NUM_PATIENTS: 1e9}, "metric 'num-patients' is 1000000000.0"),
    ({M.NUM_PATIENTS: 7.5}, "metric 'num-patients' is 7.5"),
    ({M.SUPPRESSED: 0.5}, "metric 'suppressed' is 0.5; it must be 0 or 1"),
    ({M.SUPPRESSED: None}, "metric 'suppressed' is None"),
])
def test_an_implausible_evaluation_is_dropped_as_that_sites_eval_error(changes: dict[str, float | None], why: str) -> None:
    # Arrange: k = 5; one honest site and one whose evaluation is out of range or below k
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)  # k: the default 5
    bad = {k: v for k, v in {**GOOD_EVAL, **changes}.items() if v is not None}

    # Act
    out = s.aggregate_evaluate(1, [eval_reply("good", GOOD_EVAL), eval_reply("liar", bad)])

    # Assert: the federated figures are the honest site's; the liar's evaluation is only named
    assert out is not None and out[M.AUROC] == pytest.approx(0.7) and out[M.NUM_PATIENTS] == 10
    liar = next(r for r in s.log[1].evaluate if r.site == "liar")
    assert liar.metrics == {} and error_of(liar).startswith("evaluation rejected by the coordinator: ") and why in error_of(liar)


def test_a_rejected_evaluation_is_written_only_as_its_eval_error(tmp_path: object) -> None:
    import json
    from pathlib import Path

    from server.run_folder import RunFolder
    from shared.models import build_model
    from shared.params import get_arrays
    from tests.conftest import tiny_experiment

    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)  # k: the default 5
    em = s.aggregate_evaluate(1, [eval_reply("good", GOOD_EVAL), eval_reply("liar", {**GOOD_EVAL, M.NUM_PATIENTS: 1.0, M.AUROC: 1.0})])
    folder = RunFolder(Path(str(tmp_path)) / "run", tiny_experiment(), "run-x")
    folder.record_round(1, s.log[1], {}, scalar_metrics(em), get_arrays(build_model(tiny_experiment())), True)

    stored = json.loads((Path(str(tmp_path)) / "run" / "metrics.json").read_text())[0]
    assert stored["auroc"] == pytest.approx(0.7)
    assert set(stored["sites"]["liar"]) == {"eval_error"} and "num-patients" in stored["sites"]["liar"]["eval_error"]


def bare(site: str | None, **records: object) -> Message:
    content = RecordDict({k: v for k, v in records.items()})  # type: ignore[misc]
    if site is not None:
        content[P.SITE] = ConfigRecord({P.SITE_NAME: site})
    return from_node(Message(content=content, dst_node_id=1, message_type="train"), node_of(site))


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
    assert s.log[1].train[0].site.startswith("node-") and "no 'site' record" in error_of(s.log[1].train[0])


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
    assert report.site == "alpha" and error_of(report).endswith("Message: boom") and "File x.py" not in error_of(report)
    s._sent[(3, "train")] = [7]
    s.aggregate_train(3, [])
    assert s.log[3].train[0].site == "alpha" and "no reply within `federation.round_timeout_s`" in error_of(s.log[3].train[0])


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
        replies.append(from_node(Message(content=content, dst_node_id=1, message_type="train"), node_of(site)))
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
    assert "cannot be decoded" in error_of(next(r for r in s.log[1].train if r.site == "broken"))


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


# --- what a site says is made safe to print and store, and bound to the node that said it ---


def refusal(site: str, reason: str, node: int, **extra: str) -> Message:
    """A refusal reply of ``site`` from Flower node ``node``."""
    info = ConfigRecord({P.SITE_NAME: site, P.REFUSAL_CODE: "budget", P.REFUSAL_REASON: reason, **extra})
    return from_node(Message(content=RecordDict({P.SITE: info}), dst_node_id=1, message_type="train"), node)


def test_a_refusal_reason_is_one_line_without_escape_sequences_or_control_characters() -> None:
    s = strategy()

    s.aggregate_train(1, [refusal("beta", "budget [b]x[/b]\x1b]0;TITLE\x07 \x1bc\x1b[1A\nnext\x9b2J\x7f\u202eend", node=2)])

    reason = s.log[1].train[0].refusal_reason
    assert reason == "budget [b]x[/b]  c next  end"  # markup is kept as text: the console escapes it


def test_a_long_refusal_reason_or_transport_error_is_cut_saying_how_long_it_was() -> None:
    from flwr.app import Error

    s = strategy()
    first = refusal("beta", "R" * 100_000, node=2)
    crashed = from_node(Message(Error(code=0, reason="Traceback\n" + "E" * 50_000 + "'>"), reply_to=reply("gamma", np.ones(2), 1)), 3)

    s.aggregate_train(1, [first, crashed])

    by_site = {r.site: r for r in s.log[1].train}
    assert by_site["beta"].refusal_reason == "R" * 500 + "… (cut from 100000 characters)"
    assert len(error_of(by_site["node-3"])) < 300 and "(cut from 50000 characters)" in error_of(by_site["node-3"])


def test_names_a_site_chose_are_quoted_cleaned_and_short_in_a_rejection() -> None:
    s = strategy()
    evil = bare("evil", **{P.ARRAYS: packed(np.ones(2, np.float32)), P.METRICS: MetricRecord({M.NUM_PATIENTS: 1.0})})
    for i in range(8):
        evil.content[f"[/x]\x1b[2J{i}" + "y" * 10_000] = ConfigRecord({"a": 1})

    s.aggregate_train(1, [evil])

    error = error_of(s.log[1].train[0])
    assert error.startswith("malformed reply rejected by the coordinator: unexpected record(s) ['[/x]0yyy")
    assert "\x1b" not in error and "and 3 more" in error and len(error) < 600


@pytest.mark.parametrize("name", ["oslo-university", "site_3", "Haukeland", "Tromsø", "St. Olav's hospital (Trondheim)", "a" * 64])
def test_honest_site_names_are_accepted(name: str) -> None:
    s = strategy()

    s.aggregate_train(1, [reply(name, np.ones(2), 10)])

    assert s.log[1].train[0].site == name and s.log[1].train[0].error is None


@pytest.mark.parametrize(("name", "why"), [
    ("beta\x1b]0;PWNED\x1b\\\x1b[1A", "has characters a site name may not have"),
    ("beta\x9b1A", "has characters a site name may not have"),
    ("al\u202epha", "has characters a site name may not have"),
    ("[/]", "has characters a site name may not have"),
    (" alpha", "has characters a site name may not have"),
    ("a" * 65, "has 65 characters; at most 64"),
    ("node-7", "the coordinator's label for a node that gave no name"),
    ("", "gives no site name"),
])
def test_a_site_name_with_control_characters_too_long_or_reserved_is_rejected_and_named_by_node(name: str, why: str) -> None:
    s = strategy()

    s.aggregate_train(1, [from_node(reply(name, np.ones(2), 10), 5)])

    report = s.log[1].train[0]
    assert report.site == "node-5" and error_of(report).startswith("malformed reply rejected by the coordinator: ") and why in error_of(report)
    assert "\x1b" not in error_of(report) and "\x9b" not in error_of(report) and 5 not in s.node_names


@pytest.mark.parametrize(("head", "ok"), [("0" * 64, True), ("ab12" * 16, True), ("h" * 4096, False), ("A" * 64, False), ("a" * 63, False)])
def test_a_ledger_head_must_be_a_sha256_in_hex(head: str, ok: bool) -> None:
    s = strategy()
    msg = reply("beta", np.ones(2), 10)
    msg.content.config_records[P.SITE][P.LEDGER_HEAD] = head

    s.aggregate_train(1, [msg])

    report = s.log[1].train[0]
    assert (report.ledger_head == head and report.error is None) if ok else ("is not a SHA-256 in hex" in error_of(report) and head not in error_of(report))


def test_a_node_cannot_report_under_a_name_pinned_to_another_node() -> None:
    s = strategy()
    s.aggregate_train(1, [from_node(reply("alpha", np.ones(2), 10), 1), from_node(reply("beta", np.ones(2), 10), 2)])
    impostor = from_node(reply("alpha", np.full(2, 9.0), 10), 3)
    impostor.content.metric_records[P.METRICS][M.EPSILON_RUN] = 0.01

    arrays, metrics = s.aggregate_train(2, [from_node(reply("alpha", np.ones(2), 10), 1), from_node(reply("beta", np.ones(2), 10), 2), impostor])

    np.testing.assert_allclose(values(arrays)["w"], [1.0, 1.0])  # the impostor's update is not averaged
    assert metrics is not None and metrics[M.NUM_PATIENTS] == 20
    by_site = {r.site: r for r in s.log[2].train}
    assert set(by_site) == {"alpha", "beta", "node-3"} and by_site["alpha"].error is None
    assert by_site["node-3"].error == "malformed reply rejected by the coordinator: node 3 claims the name 'alpha', which is node 1's in this run"
    assert s.node_names == {1: "alpha", 2: "beta"}


def test_a_node_cannot_change_the_name_it_was_pinned_to() -> None:
    s = strategy()
    s.aggregate_train(1, [from_node(reply("alpha", np.ones(2), 10), 1), from_node(reply("mallory", np.ones(2), 10), 3)])

    s.aggregate_train(2, [from_node(reply("alpha", np.ones(2), 10), 1), from_node(refusal("beta", "faked", node=3), 3)])

    by_site = {r.site: r for r in s.log[2].train}
    assert set(by_site) == {"alpha", "mallory"} and by_site["mallory"].refusal_code is None
    assert error_of(by_site["mallory"]).endswith("node 3 is site 'mallory' in this run and now claims the name 'beta'")


def test_two_nodes_claiming_one_new_name_in_the_same_phase_are_given_neither() -> None:
    s = strategy()

    arrays, _ = s.aggregate_train(1, [from_node(reply("alpha", np.ones(2), 10), 1), from_node(reply("alpha", np.full(2, 5.0), 10), 3), from_node(reply("beta", np.ones(2), 10), 2)])

    np.testing.assert_allclose(values(arrays)["w"], [1.0, 1.0])
    by_site = {r.site: r for r in s.log[1].train}
    assert set(by_site) == {"beta", "node-1", "node-3"} and s.node_names == {2: "beta"}
    assert all(error_of(by_site[n]).endswith("nodes 1, 3 all claim the name 'alpha' in the same phase; none of them is given it") for n in ("node-1", "node-3"))


# --- the coordinator's run against scripted sites (conftest.ScriptedGrid) ---------------------


def run_scripted(sites: dict[int, Callable[[Message], object]], tmp_path: Path, **kw: Any) -> tuple[dict, str, Path]:
    """run_federation against scripted sites; the summary, what the console printed (plain
    text: any escape sequence in it came from a site) and the run folder."""
    import io

    from rich.console import Console

    from server.federation import run_federation
    from tests.conftest import ScriptedGrid, scripted_experiment

    buf = io.StringIO()
    out = tmp_path / "run"
    grid = cast(Grid, ScriptedGrid(sites))  # duck-typed: run_federation calls only get_node_ids and send_and_receive
    summary = run_federation(grid, scripted_experiment(**kw), out, "scripted", console=Console(file=buf, width=200, color_system=None))
    return summary, buf.getvalue(), out


def test_site_text_with_rich_markup_or_escape_sequences_is_printed_as_text_and_the_run_finishes(tmp_path: Path) -> None:
    from flwr.app import Error, MessageType

    from tests.conftest import scripted_site

    def refuses(msg: Message) -> object:
        if msg.metadata.message_type != MessageType.TRAIN:
            return scripted_site("beta")(msg)
        return RecordDict({P.SITE: ConfigRecord({P.SITE_NAME: "beta", P.REFUSAL_CODE: "budget", P.REFUSAL_REASON: "over [/] budget \x1bc [link=https://evil.example/x]runbook[/link]"})})

    def odd(msg: Message) -> object:
        content = scripted_site("gamma")(msg)
        if msg.metadata.message_type == MessageType.TRAIN and msg.content.config_records[P.CONFIG][P.SERVER_ROUND] == 1:
            content["[/x]"] = ConfigRecord({"a": 1})
        if msg.metadata.message_type == MessageType.TRAIN and msg.content.config_records[P.CONFIG][P.SERVER_ROUND] == 2:
            return Error(code=0, reason="Traceback...\nClientAppException occurred. Message: bad shape [/b]'>")
        return content

    summary, printed, out = run_scripted({1: scripted_site("alpha"), 2: refuses, 3: odd}, tmp_path)

    assert summary["status"] == "completed" and (out / "summary.json").is_file()
    assert "\x1b" not in printed
    assert "site beta refused round 1: over [/] budget  c [link=https://evil.example/x]runbook[/link]" in printed
    assert "site gamma failed in round 1: malformed reply rejected by the coordinator: unexpected record(s) ['[/x]']" in printed
    assert "site gamma failed in round 2: the site's client failed (crashed or lost): ClientAppException occurred. Message: bad shape [/b]" in printed


def test_a_preflight_refusal_with_markup_is_printed_as_text_and_the_summary_written(tmp_path: Path) -> None:
    from flwr.app import MessageType

    from tests.conftest import scripted_site

    def refuses(msg: Message) -> object:
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({P.SITE: ConfigRecord({P.SITE_NAME: "gamma", P.REFUSAL_CODE: "budget", P.REFUSAL_REASON: "ε cap [/] reached"})})
        return scripted_site("gamma")(msg)

    summary, printed, out = run_scripted({1: scripted_site("alpha"), 2: scripted_site("beta"), 3: refuses}, tmp_path)

    assert summary["status"] == "refused before start" and (out / "summary.json").is_file()
    assert "gamma: ε cap [/] reached" in printed


def test_an_impostor_site_is_named_by_its_node_and_the_real_sites_figures_are_kept(tmp_path: Path) -> None:
    from flwr.app import MessageType

    from tests.conftest import scripted_site

    def impostor(msg: Message) -> object:  # answers the pre-flight as mallory, then trains as alpha
        content = scripted_site("mallory" if msg.metadata.message_type == MessageType.QUERY else "alpha")(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            content.metric_records[P.METRICS][M.EPSILON_RUN] = 0.01
            content.config_records[P.SITE][P.LEDGER_HEAD] = "f" * 64
        return content

    summary, _, out = run_scripted({1: scripted_site("alpha"), 2: scripted_site("beta"), 3: impostor}, tmp_path)

    assert summary["sites"]["alpha"]["epsilon"] == 2.0 and summary["sites"]["alpha"]["ledger_head"] == "a" * 64
    rounds = json.loads((out / "metrics.json").read_text())
    assert set(rounds[1]["sites"]) == {"alpha", "beta", "mallory"} and rounds[1]["patients_trained"] == 40
    assert rounds[1]["sites"]["mallory"]["error"].endswith("node 3 is site 'mallory' in this run and now claims the name 'alpha', which is node 1's in this run")


def test_two_nodes_giving_one_name_at_the_preflight_stop_the_run_naming_both(tmp_path: Path) -> None:
    from tests.conftest import scripted_site

    summary, printed, _ = run_scripted({1: scripted_site("alpha"), 2: scripted_site("beta"), 3: scripted_site("alpha")}, tmp_path)

    assert summary["status"] == "refused before start"
    assert {r["site"] for r in summary["preflight_refusals"]} == {"node-1", "node-3"}
    assert "nodes 1, 3 all claim the name 'alpha' in the same phase" in " ".join(printed.split())


def test_a_model_moved_further_than_the_plans_training_can_is_rejected_and_an_honest_one_kept() -> None:
    """In range (±1e4) but 5.0 from the global model: 10 Adam steps at learning rate 0.01 move a
    parameter by at most 0.10165 (shared.update_bounds), so it was not made by the plan's training."""
    from tests.conftest import ScriptedGrid

    s = strategy()
    s.set_move_bound(optimizer="adam", learning_rate=0.01, local_steps=10)
    start = np.array([2.0, -1.0])
    grid = cast(Grid, ScriptedGrid({node_of(n): (lambda m: None) for n in ("near", "edge", "far")}))  # duck-typed: configure_train asks only get_node_ids
    list(s.configure_train(1, packed(start.astype(np.float32)), ConfigRecord(), grid))  # the round's global model, as sent
    bound = s.max_move
    assert bound is not None and bound == pytest.approx(0.10165, abs=1e-5)

    arrays, metrics = s.aggregate_train(1, [
        reply("near", start + [0.05, -0.03], 10),
        reply("edge", start + [bound, -bound], 10),  # the most the plan's training can do: kept
        reply("far", start + [0.0, 5.0], 10),
    ])

    np.testing.assert_allclose(values(arrays)["w"], start + [(0.05 + bound) / 2, (-0.03 - bound) / 2], rtol=1e-6)
    assert metrics is not None and metrics[M.NUM_PATIENTS] == 20
    far = next(r for r in s.log[1].train if r.site == "far")
    assert far.error == ("update rejected by the coordinator: parameter 'w' moved 5 from the round's global model; the plan's "
                         "training (10 Adam step(s) at learning rate 0.01) moves a parameter by at most 0.1017")


def test_sgd_plans_have_no_move_bound_and_only_the_range_check_applies() -> None:
    from tests.conftest import ScriptedGrid

    s = strategy()
    s.set_move_bound(optimizer="sgd", learning_rate=0.01, local_steps=10)
    grid = cast(Grid, ScriptedGrid({node_of("far"): lambda m: None}))  # duck-typed: configure_train asks only get_node_ids
    list(s.configure_train(1, packed(np.zeros(2, dtype=np.float32)), ConfigRecord(), grid))
    arrays, _ = s.aggregate_train(1, [reply("far", np.array([0.0, 5.0]), 10)])
    np.testing.assert_allclose(values(arrays)["w"], [0.0, 5.0])
