"""Layers run with one copy of their parameters per patient, on session-major rows.

The ``grouped`` strategy of :mod:`client.patient_grads` runs the model once over all B·K
sessions of a batch as *session-major* rows (row n = k·B + b is patient b's k-th session, so a
(N, *) tensor is a (K, B, *) block without a copy). During that pass each trainable layer of a
supported type computes its ordinary output, but with its parameters stacked B times, one copy
per patient, each applied to that patient's rows only. The output is the same as the ordinary
layer's (every copy holds the same values), and autograd's ordinary backward pass then gives
the gradient with respect to each copy: that patient's own gradient, because a patient's rows
touch only their copy. Exact because sessions never interact (GroupNorm, never BatchNorm) and
padded sessions have zero loss weight; probes in :mod:`client.patient_grads` refuse a model
whose forward mixes rows or calls a layer on anything but the batch's rows in order.

Each layer keeps the ordinary layer's kernels: a Conv1d is one convolution with the patients as
channel groups (x (K, B·C, L), weight (B·O, C/groups, k), groups B·groups), whose backward is
one ``convolution_backward`` giving the input gradient and every patient's weight gradient; a
GroupNorm is one group norm of K samples of B·C channels in B·G groups (the same groups, so the
same statistics); a Linear is one batched matmul over patients; a LayerNorm normalises each row
and scales it by its patient's copy. Nothing runs in Python during the backward pass.

Each form (:class:`PatientLayer`) stacks a parameter's B copies in the shape its kernel takes,
turns the gradient of those copies back into (B, *shape) rows, and computes the layer's output
rows from ``w``, {attribute: copies} (a trainable parameter's copies are the autograd leaves; a
frozen one's are plain copies).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

# Up to this many weight values (O · C/groups · k) a conv layer runs as ONE convolution with the
# patients as channel groups; above it, as one convolution per patient over their K sessions.
# Both give the same values; the limit is about speed. Measured for the earlier per-patient
# weight-gradient rule (the same grouped backward kernel; the forward and input-gradient calls
# are now grouped too), on the 2-core AMD EPYC (8 patients × 12 sessions, 2 threads): the grouped
# kernel beat the per-patient loop from 16 → 16 channels (0.55 vs 1.46 ms) to 256 → 256 (15.0 vs
# 18.3 ms, k = 5) but lost at 512 → 512 (78.6 vs 51.6 ms), where it no longer blocks well. On a
# GPU it is one kernel call instead of B.
ONE_CALL_WEIGHT_AT_MOST = 1 << 19


class UnsupportedLayerError(ValueError):
    """The ``grouped`` strategy has no exact per-patient form of a layer of the model."""


def check_rows(layer: nn.Module, x: torch.Tensor, rows: int, *, min_dim: int) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``x`` is ``rows`` session rows of at least ``min_dim`` dimensions."""
    if x.dim() < min_dim or x.shape[0] != rows:
        raise UnsupportedLayerError(
            f"{type(layer).__name__} was called on a tensor of shape {tuple(x.shape)}; the `grouped` per-patient gradients need every call of a "
            f"trainable layer on the batch's {rows} session rows (first dimension), with at least {min_dim} dimensions. Set `training.per_patient_grads` to functorch."
        )


class PatientLayer:
    """A layer type's per-patient form.

    ``copies`` stacks one tensor per patient (B of them: the parameter itself B times in
    training) in the shape the layer's kernel takes, so that the Conv1d, GroupNorm and Linear
    forms add no reshaping step on the copies to autograd's graph; ``rows`` turns the gradient
    of those copies back into (B, *shape) rows; ``forward`` computes the layer's output rows.
    """

    min_dim = 2  # the rows' least number of dimensions

    @staticmethod
    def copies(attr: str, per_patient: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(per_patient)  # (B, *shape)

    @staticmethod
    def rows(attr: str, g: torch.Tensor, b: int) -> torch.Tensor:
        return g

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        raise NotImplementedError


class Linear(PatientLayer):
    """x (N, *, in) -> (N, *, out): one batched matmul over patients; copies weight (B, in, out) (transposed), bias (B, 1, out)."""

    @staticmethod
    def copies(attr: str, per_patient: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([p.t() if attr == "weight" else p.view(1, -1) for p in per_patient])  # (B, in, out) or (B, 1, out)

    @staticmethod
    def rows(attr: str, g: torch.Tensor, b: int) -> torch.Tensor:
        return g.transpose(1, 2) if attr == "weight" else g.view(b, -1)  # (B, out, in) or (B, out)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        bias = w.get("bias")
        if x.dim() == 2:  # (N, in) = (K, B, in): a strided (B, K, in) view
            xp = x.view(-1, b, x.shape[1]).transpose(0, 1)
            out = torch.bmm(xp, w["weight"]) if bias is None else torch.baddbmm(bias, xp, w["weight"])  # (B, K, out)
            return out.transpose(0, 1).reshape(x.shape[0], out.shape[2])  # (N, out) in row order
        xp = x.reshape(-1, b, x[0].numel() // x.shape[-1], x.shape[-1]).transpose(0, 1).flatten(1, 2)  # (N, S.., in) -> (B, K·S, in), a copy
        out = torch.bmm(xp, w["weight"]) if bias is None else torch.baddbmm(bias, xp, w["weight"])  # (B, K·S, out)
        return out.view(b, -1, *x.shape[1:-1], out.shape[-1]).transpose(0, 1).reshape(*x.shape[:-1], out.shape[-1])  # (N, *, out) in row order


class Conv1d(PatientLayer):
    """x (N, C, L_in) -> (N, O, L_out); copies weight (B·O, C/groups, k), bias (B·O).

    Contiguous session-major rows are a batch of K samples with the B patients as channel
    blocks: x is (K, B·C, L_in) without a copy, and a convolution with B·groups groups and the
    copies as its weight applies patient b's weight to patient b's block only; its backward is
    one ``convolution_backward`` giving the input gradient and every patient's weight gradient.
    Above :data:`ONE_CALL_WEIGHT_AT_MOST` weight values, one convolution per patient instead.
    """

    min_dim = 3

    @staticmethod
    def copies(attr: str, per_patient: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(per_patient)  # (B·O, C/groups, k) or (B·O,)

    @staticmethod
    def rows(attr: str, g: torch.Tensor, b: int) -> torch.Tensor:
        return g.view(b, -1, *g.shape[1:])  # (B, O, C/groups, k) or (B, O)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        assert isinstance(layer, nn.Conv1d)
        if layer.padding_mode != "zeros":  # as nn.Conv1d does it: pad each row, then no padding
            x = functional.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding: int | str | tuple[int, ...] = 0
        else:
            padding = layer.padding
        weight, bias = w["weight"], w.get("bias")  # (B·O, C/groups, k), (B·O,)
        o = weight.shape[0] // b
        if layer.weight.numel() > ONE_CALL_WEIGHT_AT_MOST:
            xs = x.unflatten(0, (-1, b))  # (K, B, C, L_in)
            outs = [functional.conv1d(xs[:, i], weight[i * o : (i + 1) * o], None if bias is None else bias[i * o : (i + 1) * o], layer.stride, padding, layer.dilation, layer.groups) for i in range(b)]  # B × (K, O, L_out)
            return torch.stack(outs, dim=1).flatten(0, 1)  # (N, O, L_out)
        out = functional.conv1d(x.contiguous().view(-1, b * x.shape[1], x.shape[2]), weight, bias, layer.stride, padding, layer.dilation, layer.groups * b)  # (K, B·O, L_out)
        return out.view(-1, o, out.shape[2])  # (N, O, L_out)


class GroupNorm(PatientLayer):
    """x (N, C, *) -> (N, C, *); copies weight and bias (B·C).

    The rows as K samples of B·C channels in B·G groups: patient b's group j is group b·G + j of
    a sample, the same elements as the ordinary layer's group j of that row, so the same
    statistics; the affine weight of channel b·C + c is patient b's copy of channel c's.
    """

    @staticmethod
    def copies(attr: str, per_patient: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(per_patient)  # (B·C,)

    @staticmethod
    def rows(attr: str, g: torch.Tensor, b: int) -> torch.Tensor:
        return g.view(b, -1)  # (B, C)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        assert isinstance(layer, nn.GroupNorm)
        out = functional.group_norm(x.reshape(-1, b * x.shape[1], *x.shape[2:]), layer.num_groups * b, w.get("weight"), w.get("bias"), layer.eps)  # (K, B·C, *)
        return out.view(x.shape)


class LayerNorm(PatientLayer):
    """x (N, *, *normalized_shape) -> the same shape; copies weight and bias (B, *normalized_shape).

    Each row is normalised on its own (no affine part), then scaled and shifted by its patient's copies.
    """

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        assert isinstance(layer, nn.LayerNorm)
        out = functional.layer_norm(x, layer.normalized_shape, None, None, layer.eps)  # (N, *, *normalized_shape)
        per_patient = (1, b) + (1,) * (x.dim() - 1 - len(layer.normalized_shape)) + tuple(layer.normalized_shape)  # (1, B, 1.., *normalized_shape)
        out = out.view(-1, b, *x.shape[1:])  # (K, B, *, *normalized_shape)
        if "weight" in w:
            out = out * w["weight"].view(per_patient)
        if "bias" in w:
            out = out + w["bias"].view(per_patient)
        return out.view(x.shape)


PATIENT_LAYERS: dict[type[nn.Module], type[PatientLayer]] = {nn.Linear: Linear, nn.Conv1d: Conv1d, nn.GroupNorm: GroupNorm, nn.LayerNorm: LayerNorm}


def patient_forward(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], b: int, rows: int) -> torch.Tensor:
    """The layer's output on ``rows`` session-major rows with per-patient copies ``w`` ({attribute: copies in :meth:`PatientLayer.copies`' shape})."""
    form = PATIENT_LAYERS[type(layer)]
    check_rows(layer, x, rows, min_dim=form.min_dim)
    return form.forward(layer, x, w, b)


def check_layer(name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming ``name`` unless the layer has an exact per-patient form."""
    label = f"layer {name!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedLayerError(f"The `grouped` per-patient gradients refuse {label}: batch statistics mix sessions of different patients, so no row belongs to one patient; use GroupNorm.")
    if type(module) not in PATIENT_LAYERS:
        raise UnsupportedLayerError(
            f"The `grouped` per-patient gradients have no rule for {label}, which holds trainable parameters; "
            f"supported: {', '.join(t.__name__ for t in PATIENT_LAYERS)}. Set `training.per_patient_grads` to functorch or hooks."
        )
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:  # weight_norm's weight_g/weight_v, pruning's weight_orig: the forward reads a weight computed from them
        raise UnsupportedLayerError(
            f"The `grouped` per-patient gradients need {label} to hold its parameters as `weight` and `bias` (it holds {', '.join(sorted(own))}: "
            "a reparametrised weight, e.g. weight norm or pruning). Set `training.per_patient_grads` to functorch or hooks."
        )
    if "forward" in vars(module):
        raise UnsupportedLayerError(f"{label[0].upper()}{label[1:]} has its own `forward` set on the instance, which the `grouped` per-patient form would bypass. Set `training.per_patient_grads` to functorch or hooks.")
