"""Model parameters as ordered float32 numpy arrays, their wire format (one packed float32
vector per model), and safetensors checkpoints."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save
from torch import nn

from shared.atomic import write_atomically


def get_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Every parameter and buffer, by name, as CPU float32 arrays."""
    return OrderedDict((k, v.detach().cpu().float().numpy().copy()) for k, v in model.state_dict().items())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer's shape, by name (what :func:`check_arrays` compares against)."""
    return layout(model.state_dict())


def check_arrays(expected: Mapping[str, tuple[int, ...]], arrays: dict[str, np.ndarray]) -> None:
    """Refuse ``arrays`` whose names or shapes differ from ``expected`` or that hold NaN/Inf
    (a ValueError naming the first problem)."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"Parameter names do not match the model: missing {missing}, unexpected {extra}.")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise ValueError(f"Parameter {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k])}.")
        if not np.isfinite(v).all():
            raise ValueError(f"Parameter {k!r} holds NaN or infinite values.")


def set_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays into ``model``, refusing wrong names or shapes with a clear message."""
    check_arrays(shapes(model), arrays)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, mode 0600 (as safetensors' own ``save_file`` creates
    it); a failed write leaves the old file as it was and no temporary file."""
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
    write_atomically(path, lambda fh: fh.write(data))


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


# The wire format. A model travels as ONE float32 Array holding every parameter and buffer,
# flattened (C order) and concatenated in the model's state_dict order: Flower stores each
# Array and its chunk(s) as separate objects, each pulled/pushed as its own request, so one
# array per message instead of one per parameter cuts a train message of the default model
# from 28 objects to 6 (Flower stores equal arrays once, so an untrained model made 24). Names and shapes are not sent: both sides build the layout from the
# approved plan's model (`layout`), and decoding checks the length against it first.

Layout = Mapping[str, tuple[int, ...]]  # parameter name -> shape, in the model's state_dict order

PACKED = "model"  # the name of the one Array in a packed ArrayRecord
WIRE_DTYPE = np.dtype(np.float32)


def layout(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The layout of a parameter dict: name -> shape, in its order."""
    return {k: tuple(v.shape) for k, v in arrays.items()}


def layout_size(shapes_: Layout) -> int:
    """How many values a packed model of this layout holds."""
    return sum(math.prod(s) for s in shapes_.values())


def flatten(arrays: Mapping[str, np.ndarray], shapes_: Layout) -> np.ndarray:
    """The packed vector (N,) float32: ``arrays`` in the layout's order (not the dict's).

    Refuses (ValueError) names or shapes that differ from the layout, and any dtype but
    float32: the model sent is the model signed, so nothing is cast on the way.
    """
    missing = sorted(set(shapes_) - set(arrays))
    extra = sorted(set(arrays) - set(shapes_))
    if missing or extra:
        raise ValueError(f"Cannot pack the model: parameter names differ from the plan's model (missing {missing}, unexpected {extra}).")
    parts = []
    for name, shape in shapes_.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"Cannot pack the model: parameter {name!r} has shape {tuple(value.shape)}, the plan's model {tuple(shape)}.")
        if value.dtype != WIRE_DTYPE:
            raise ValueError(f"Cannot pack the model: parameter {name!r} is {value.dtype}; models travel as float32 only.")
        parts.append(value.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, WIRE_DTYPE)  # (N,)


def unflatten(flat: np.ndarray, shapes_: Layout, *, what: str) -> OrderedDict[str, np.ndarray]:
    """Name -> array (views into ``flat``, shaped by the layout); a ValueError naming ``what``
    (e.g. "the update of site oslo") when ``flat`` is not a float32 vector of the layout's length."""
    if flat.ndim != 1 or flat.dtype != WIRE_DTYPE:
        raise ValueError(f"{_cap(what)} is a {flat.dtype} array of shape {tuple(flat.shape)}; a packed model is one float32 vector.")
    expected = layout_size(shapes_)
    if flat.size != expected:
        raise ValueError(f"{_cap(what)} holds {flat.size} values; the plan's model has {expected}.")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    start = 0
    for name, shape in shapes_.items():
        size = math.prod(shape)
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def pack(arrays: Mapping[str, np.ndarray], shapes_: Layout) -> ArrayRecord:
    """Flower's wire form of a model: one float32 Array (see :func:`flatten`)."""
    return ArrayRecord({PACKED: Array(flatten(arrays, shapes_))})


def packed_vector(record: ArrayRecord, *, what: str) -> np.ndarray:
    """The one float32 vector (N,) of a packed record; a ValueError naming ``what`` when the
    record holds anything else or its bytes cannot be decoded (checked before decoding)."""
    names = list(record.keys())
    if names != [PACKED]:
        raise ValueError(f"{_cap(what)} holds the arrays {names[:5]}{'…' if len(names) > 5 else ''}; a packed model is one array named {PACKED!r}.")
    array = record[PACKED]
    if array.dtype != WIRE_DTYPE.name or len(array.shape) != 1:
        raise ValueError(f"{_cap(what)} is a {array.dtype} array of shape {tuple(array.shape)}; a packed model is one float32 vector.")
    try:
        flat = array.numpy()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{_cap(what)} cannot be decoded ({exc}).") from exc
    if flat.dtype != WIRE_DTYPE or flat.shape != tuple(array.shape):  # the bytes disagree with the header
        raise ValueError(f"{_cap(what)} decodes to a {flat.dtype} array of shape {flat.shape}, not the float32 vector its header declares.")
    return flat


def unpack(record: ArrayRecord, shapes_: Layout, *, what: str) -> OrderedDict[str, np.ndarray]:
    """A packed record as name -> array in the layout's order; ValueError naming ``what``."""
    return unflatten(packed_vector(record, what=what), shapes_, what=what)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]
