"""Model parameters as ordered float32 numpy arrays, and safetensors checkpoints."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file
from torch import nn


def get_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Every parameter and buffer, by name, as CPU float32 arrays."""
    return OrderedDict((k, v.detach().cpu().float().numpy().copy()) for k, v in model.state_dict().items())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer's shape, by name (what :func:`check_arrays` compares against)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    """Write a safetensors file atomically."""
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Flower's wire form of a parameter dict (names kept, order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())
