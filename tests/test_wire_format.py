"""The model travels as one packed float32 vector; names and shapes come from the plan's model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from shared import protocol as P  # noqa: N812
from shared.models import build_model
from shared.params import PACKED, flatten, layout, layout_size, pack, unpack
from tests.conftest import tiny_experiment

LAYOUT = {"conv.weight": (4, 1, 3), "conv.bias": (4,), "head.weight": (1, 4), "head.bias": (2,)}


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def model(seed: int = 0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(s).astype(np.float32)) for k, s in LAYOUT.items())


def test_pack_then_unpack_gives_the_same_names_shapes_order_and_bits() -> None:
    arrays = model()
    record = pack(arrays, LAYOUT)
    assert list(record.keys()) == [PACKED]
    assert record[PACKED].shape == (layout_size(LAYOUT),) == (22,)
    back = unpack(record, LAYOUT, what="the test model")
    assert list(back) == list(LAYOUT)
    for name, value in arrays.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape and back[name].tobytes() == value.tobytes()


def test_packing_follows_the_layout_not_the_dicts_order() -> None:
    # A checkpoint read back by name may come in another order; the wire order is the model's.
    arrays = model()
    shuffled = dict(reversed(list(arrays.items())))
    assert flatten(shuffled, LAYOUT).tobytes() == flatten(arrays, LAYOUT).tobytes()
    assert flatten(arrays, LAYOUT)[:12].tobytes() == arrays["conv.weight"].tobytes()


@pytest.mark.parametrize(("change", "why"), [
    (lambda a: a.pop("head.bias"), "missing ['head.bias']"),
    (lambda a: a.update(extra=np.zeros(1, np.float32)), "unexpected ['extra']"),
    (lambda a: a.update({"conv.bias": np.zeros(5, np.float32)}), "'conv.bias' has shape (5,), the plan's model (4,)"),
    (lambda a: a.update({"conv.bias": np.zeros(4, np.float64)}), "'conv.bias' is float64; models travel as float32 only"),
])
def test_a_model_that_does_not_fit_the_layout_is_not_packed(change: object, why: str) -> None:
    arrays = model()
    change(arrays)  # type: ignore[operator]
    with pytest.raises(ValueError, match="Cannot pack the model") as err:
        pack(arrays, LAYOUT)
    assert why in str(err.value)


@pytest.mark.parametrize(("record", "why"), [
    (ArrayRecord({PACKED: Array(np.zeros(21, np.float32))}), "The update of site oslo holds 21 values; the plan's model has 22."),
    (ArrayRecord({PACKED: Array(np.zeros(23, np.float32))}), "The update of site oslo holds 23 values; the plan's model has 22."),
    (ArrayRecord({PACKED: Array(np.zeros(22, np.float64))}), "The update of site oslo is a float64 array of shape (22,); a packed model is one float32 vector."),
    (ArrayRecord({PACKED: Array(np.zeros((2, 11), np.float32))}), "is a float32 array of shape (2, 11)"),
    (ArrayRecord({k: Array(v) for k, v in model().items()}), "The update of site oslo holds the arrays ['conv.weight', 'conv.bias', 'head.weight', 'head.bias']"),
    (ArrayRecord({PACKED: Array(dtype="float32", shape=(22,), stype="numpy.ndarray", data=b"not npy")}), "The update of site oslo cannot be decoded"),
    (ArrayRecord({PACKED: Array(dtype="float32", shape=(22,), stype="numpy.ndarray", data=Array(np.zeros(22, np.int32)).data)}), "decodes to a int32 array"),
])
def test_a_packed_model_of_the_wrong_length_or_type_is_refused_naming_it(record: ArrayRecord, why: str) -> None:
    with pytest.raises(ValueError) as err:
        unpack(record, LAYOUT, what="the update of site oslo")
    assert why in str(err.value)


def test_a_message_carries_the_model_as_one_array_of_six_objects() -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from server.bench_fl import message_objects, wire_objects

    exp = tiny_experiment()
    arrays = get_arrays_distinct(exp)
    content = RecordDict({P.ARRAYS: pack(arrays, layout(arrays)), P.CONFIG: ConfigRecord({P.RUN_ID: "r", P.PLAN_YAML: exp.to_yaml()})})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    kinds = [type(o).__name__ for o in get_all_nested_objects(msg).values()]
    assert sorted(kinds) == sorted(["ArrayChunk", "Array", "ArrayRecord", "ConfigRecord", "RecordDict", "Message"])
    assert message_objects(content) == len(kinds) == 6
    counts = wire_objects(exp)
    assert counts["train_message_packed"] == 6 and counts["train_reply_packed"] == 7
    assert counts["train_message_one_array_per_parameter"] == 4 + 2 * len(arrays)  # each Array and its chunk before


def get_arrays_distinct(exp: object) -> dict[str, np.ndarray]:
    from shared.params import get_arrays

    return dict(get_arrays(build_model(exp)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("incoming", "code", "why"), [
    ([np.zeros(21, np.float32)], "invalid-model", "Site oslo cannot load the global model: The global model of round 2 holds 21 values; the plan's model has 22."),
    ([np.zeros(12, np.float32), np.zeros(10, np.float32)], "malformed", "the global model of round 2 arrives as 2 arrays; a packed model is one float32 vector"),
    ([np.zeros(22, np.float64)], "malformed", "the global model of round 2 is a float64 array of shape (22,)"),
])
def test_a_site_refuses_a_secagg_global_model_that_is_not_one_vector_of_the_plans_length(incoming: list[np.ndarray], code: str, why: str) -> None:
    from client.app import unpack_model
    from client.site import Refusal

    refusal = unpack_model("oslo", incoming, LAYOUT, 2)
    assert isinstance(refusal, Refusal) and refusal.code == code and why in refusal.reason
    assert unpack_model("oslo", [flatten(model(), LAYOUT)], LAYOUT, 2).keys() == LAYOUT.keys()  # type: ignore[union-attr]
