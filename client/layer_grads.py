"""Per-patient parameter gradients of one layer from its input and its output's gradient.

The ``grouped`` strategy of :mod:`client.patient_grads` runs one ordinary forward and backward
pass over all B·K sessions of a batch, keeping each trainable layer's input ``x`` and the
gradient ``g`` of the summed patient losses with respect to the layer's output. Rows are
*session-major*: row n = k·B + b is patient b's k-th session, so x (N, *) is a (K, B, *) block
without a copy. A session's rows touch no other session's, so ``g`` row n is the gradient of
its own patient's loss alone, and a patient's parameter gradient is the contraction of ``x``
and ``g`` over that patient's K sessions (and positions): the same multiply-adds as the
ordinary weight gradient, grouped by patient instead of summed over the batch. Padded
sessions carry ``g = 0`` (their loss weight is 0), exactly as in the patient's loss.

Each function returns ``{attribute: (B, *param.shape)}`` for the layer's trainable parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

WIDE = (torch.float32, torch.float64)  # dtypes rows are kept in; narrower ones (bf16 under autocast) are summed into float32
LayerGrads = Callable[..., dict[str, torch.Tensor]]  # (layer, x, g, B[, forward state]) -> {attribute: (B, *shape)}
ForwardState = Callable[[nn.Module, torch.Tensor], object]  # (layer, output) -> what the rule needs from the forward pass


class UnsupportedLayerError(ValueError):
    """The ``grouped`` strategy has no exact per-patient rule for a layer of the model."""


def linear_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, state: None = None) -> dict[str, torch.Tensor]:
    """x (N, *, in), g (N, *, out) -> weight (B, out, in) = Σ over a patient's rows of g xᵀ; bias (B, out)."""
    assert isinstance(layer, nn.Linear)
    gk = g.reshape(-1, b, math.prod(g.shape[1:-1]) * layer.out_features)  # (K, B, S·out)
    out = {}
    if layer.weight.requires_grad:
        if g.dim() == 2:  # (B, out, K) @ (B, K, in): strided views of the session-major rows, no copy
            out["weight"] = torch.bmm(gk.permute(1, 2, 0), x.to(g.dtype).reshape(-1, b, layer.in_features).transpose(0, 1))
        else:  # (B, out, K·S) @ (B, K·S, in)
            gs, xs = gk.unflatten(-1, (-1, layer.out_features)), x.to(g.dtype).reshape(-1, b, gk.shape[-1] // layer.out_features, layer.in_features)  # (K, B, S, out), (K, B, S, in)
            out["weight"] = torch.bmm(gs.permute(1, 3, 0, 2).flatten(2), xs.transpose(0, 1).flatten(1, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = gk.reshape(gk.shape[0], b, -1, layer.out_features).sum((0, 2))  # (B, out)
    return out


# Up to this many weight values (O · C/groups · k) a conv layer's per-patient weight gradients
# come from ONE weight-gradient call with the patients as channel groups
# (:func:`_session_major_conv1d_weight`); above it, from one call per patient. Both produce
# only the (B, *weight) result, so the limit is about speed, not memory: on the 2-core AMD EPYC
# (8 patients × 12 sessions, 2 threads, ms) the one call beats the per-patient loop from
# 16 → 16 channels (0.55 vs 1.46) to 256 → 256 (15.0 vs 18.3, k = 5) but loses at
# 512 → 512 (78.6 vs 51.6), where the grouped kernel no longer blocks well. On a GPU it is one
# kernel call instead of B.
ONE_CALL_WEIGHT_AT_MOST = 1 << 19


def _session_major_conv1d_weight(layer: nn.Conv1d, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: int, *, input_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """x (N, C, L_in), g (N, O, L_out), session-major rows -> (input gradient (N, C, L_in) or None, weight rows (B, O, C/groups, k)) from ONE call.

    Contiguous session-major rows already are a batch of K with the B patients as channel
    blocks: x is (K, B·C, L_in) and g (K, B·O, L_out) without a copy. A convolution with
    B·groups groups has weight (B·O, C/groups, k), whose block b is patient b's own weight
    gradient, and the kernel's sum over the batch is the sum over the patient's K sessions.
    With ``input_grad`` the grouped weight is the layer's weight repeated B times, so the same
    call's input gradient is the ordinary one of every row (each patient block convolved with
    the one weight): the backward pass's input gradient and the per-patient weight gradients
    in one kernel call instead of two.
    """
    args = (layer.stride, layer.padding, layer.dilation, False, (0,), layer.groups * b, (input_grad, True, False))
    # Without the input gradient the weight only gives the shape: its values enter nothing that is asked for.
    grouped_w = w.expand(b, *w.shape).reshape(b * w.shape[0], *w.shape[1:]) if input_grad else w.new_empty((b * w.shape[0], *w.shape[1:]))  # (B·O, C/groups, k); expand+copy: half of repeat's time
    gx, rows, _ = torch.ops.aten.convolution_backward(g.view(-1, b * g.shape[1], g.shape[2]), x.view(-1, b * x.shape[1], x.shape[2]), grouped_w, None, *args)  # (K, B·C, L_in), (B·O, C/groups, k)
    return (gx.view(x.shape) if input_grad else None), rows.view(b, *w.shape)  # (N, C, L_in), (B, O, C/groups, k)


def conv1d_one_call(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether a Conv1d's per-patient weight gradients come from the one grouped call (:data:`ONE_CALL_WEIGHT_AT_MOST`)."""
    return isinstance(layer, nn.Conv1d) and x.dim() == 3 and layer.weight.numel() <= ONE_CALL_WEIGHT_AT_MOST


def conv1d_backward_with_patient_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, *, input_grad: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """x (N, C, L_in), g (N, O, L_out) -> (the input's gradient (N, C, L_in) in x's dtype, or None; {weight: (B, O, C/groups, k), bias: (B, O)}).

    The layer's whole backward pass for the `grouped` strategy in one weight-gradient call
    (:func:`_session_major_conv1d_weight` with the input gradient): autograd's own call for the
    input gradient plus the per-patient call cost ≈ 1.3× this one on the 2-core CPU.
    """
    assert isinstance(layer, nn.Conv1d)
    xc = x.to(g.dtype).contiguous()  # (N, C, L_in)
    gc = g.contiguous()  # (N, O, L_out)
    out = {}
    gx = None
    if layer.weight.requires_grad or input_grad:
        gx, weight = _session_major_conv1d_weight(layer, xc, gc, layer.weight.detach().to(g.dtype), b, input_grad=input_grad)
        if layer.weight.requires_grad:
            out["weight"] = _float32_rows(weight)
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = _conv1d_bias_rows(gc, b)
    return (gx.to(x.dtype) if gx is not None else None), out


def _float32_rows(rows: torch.Tensor) -> torch.Tensor:
    """Per-patient rows in float32 or wider (bf16 under autocast: float32 rows)."""
    return rows if rows.dtype in WIDE else rows.float()


def _conv1d_bias_rows(g: torch.Tensor, b: int) -> torch.Tensor:
    """g (N, O, L_out) session-major rows -> each patient's Conv1d bias gradient (B, O), summed in float32 or wider."""
    return g.unflatten(0, (-1, b)).sum((0, 3), dtype=None if g.dtype in WIDE else torch.float32)


def conv1d_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, state: None = None, *, one_call: bool | None = None) -> dict[str, torch.Tensor]:
    """x (N, C, L_in), g (N, O, L_out) -> weight (B, O, C/groups, k); bias (B, O).

    The ordinary weight-gradient convolution (the kernel the plain backward pass uses, as in
    ``torch.nn.grad.conv1d_weight``), either once with the patients as channel groups
    (:func:`_session_major_conv1d_weight`, while the weight has at most
    :data:`ONE_CALL_WEIGHT_AT_MOST` values) or once per patient over their K sessions;
    ``one_call`` forces either way. A vmapped (grouped) convolution or an im2col matmul costs
    3-4× the batch's single weight gradient on CPU; the one call costs about the same as it.
    """
    assert isinstance(layer, nn.Conv1d)
    if x.dim() != 3:
        raise UnsupportedLayerError(f"Conv1d got an input of shape {tuple(x.shape)}; the `grouped` per-patient gradients need batched (N, C, L) inputs.")
    if one_call if one_call is not None else conv1d_one_call(layer, x):
        return conv1d_backward_with_patient_grads(layer, x, g, b, input_grad=False)[1]
    out = {}
    if layer.weight.requires_grad:
        xs, gs = x.to(g.dtype).contiguous().unflatten(0, (-1, b)), g.unflatten(0, (-1, b))  # (K, B, C, L_in), (K, B, O, L_out)
        w = layer.weight.detach().to(g.dtype)
        args = (layer.stride, layer.padding, layer.dilation, False, (0,), layer.groups, (False, True, False))
        # the op behind torch.nn.grad.conv1d_weight, called directly: its Python wrapper costs ~10 µs × B × layers per step
        weight = torch.stack([torch.ops.aten.convolution_backward(gs[:, i], xs[:, i], w, None, *args)[1] for i in range(b)])  # (B, O, C/groups, k)
        out["weight"] = _float32_rows(weight)
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = _conv1d_bias_rows(g, b)
    return out


def group_norm_stats(layer: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The forward pass's own per-row group mean and 1/std, (N, G) each, from the output's autograd node.

    Read at forward time (autograd frees them in the backward pass); ``None`` when the output
    did not come from PyTorch's native group norm, and the statistics are then recomputed.
    """
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()  # (N, G) mean, (N, G) rstd


def group_norm_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """x, g (N, C, *) -> weight (B, C) = Σ g·x̂ and bias (B, C) = Σ g over a patient's rows and positions.

    Σ g·x̂ = rstd·(Σ g·x − mean·Σ g) per row and channel, as PyTorch's own group-norm backward
    computes it, with the forward pass's statistics (:func:`group_norm_stats`); without them
    x̂ is recomputed from x (one group-norm pass without the affine part).
    """
    assert isinstance(layer, nn.GroupNorm)
    n, c = g.shape[0], layer.num_channels
    gs = g.reshape(n, c, -1)  # (N, C, positions)
    sum_g = gs.sum(-1)  # (N, C)
    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        xs = x.to(g.dtype).reshape(gs.shape)  # (N, C, positions)
        if stats is None:
            xhat = nn.functional.group_norm(xs, layer.num_groups, eps=layer.eps)  # (N, C, positions)
            sum_gxhat = (gs * xhat).sum(-1)  # (N, C)
        else:
            mean, rstd = (s.to(g.dtype).view(n, layer.num_groups, 1) for s in stats)  # (N, G, 1) each
            per_group = (n, layer.num_groups, c // layer.num_groups)
            sum_gxhat = (((gs * xs).sum(-1).view(per_group) - mean * sum_g.view(per_group)) * rstd).view(n, c)  # (N, C)
        out["weight"] = sum_gxhat.view(-1, b, c).sum(0)  # (B, C): each patient's K session rows
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = sum_g.view(-1, b, c).sum(0)  # (B, C)
    return out


def group_norm_one_call(layer: nn.Module, x: torch.Tensor, output: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether a GroupNorm call's backward can be :func:`group_norm_backward_with_patient_grads` (native statistics, float32/64 output, (N, C, *) rows)."""
    return isinstance(layer, nn.GroupNorm) and stats is not None and output.dtype in WIDE and x.dim() >= 2 and x.shape[1] == layer.num_channels


def group_norm_backward_with_patient_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, stats: tuple[torch.Tensor, torch.Tensor], *, input_grad: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """x, g (N, C, *) session-major rows, the forward pass's (N, G) mean and rstd -> (the input's gradient in x's dtype or None; {weight, bias: (B, C)}).

    The layer's whole backward pass for the `grouped` strategy in one call of PyTorch's own
    group-norm backward: the rows as K samples of B·C channels in B·G groups (patient b's group
    j is group b·G + j of a sample; same elements, same statistics, so the same input gradient)
    with the affine weight repeated B times, whose weight and bias gradients, summed over the
    K samples, are each patient's own. Replaces autograd's group-norm backward plus
    :func:`group_norm_grads`.
    """
    assert isinstance(layer, nn.GroupNorm)
    c, groups = layer.num_channels, layer.num_groups
    positions = math.prod(x.shape[2:])
    xc = x.to(g.dtype).contiguous().view(-1, b * c, positions)  # (K, B·C, positions)
    gc = g.contiguous().view(xc.shape)  # (K, B·C, positions)
    mean, rstd = (s.to(g.dtype).reshape(-1, b * groups) for s in stats)  # (K, B·G) each
    want_weight, want_bias = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
    weight = layer.weight.detach().to(g.dtype).expand(b, c).reshape(b * c)  # (B·C,)
    gx, gw, gb = torch.ops.aten.native_group_norm_backward(gc, xc, mean, rstd, weight, xc.shape[0], b * c, positions, b * groups, [input_grad, want_weight, want_bias])
    out = {}
    if want_weight:
        out["weight"] = gw.view(b, c)  # (B, C)
    if want_bias:
        out["bias"] = gb.view(b, c)  # (B, C)
    return (gx.view(x.shape).to(x.dtype) if input_grad else None), out


LAYER_GRADS: dict[type[nn.Module], LayerGrads] = {
    nn.Linear: linear_grads,
    nn.Conv1d: conv1d_grads,
    nn.GroupNorm: group_norm_grads,
}
FORWARD_STATE: dict[type[nn.Module], ForwardState] = {nn.GroupNorm: group_norm_stats}


def check_layer(name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming ``name`` unless the grouped rule for it is exact."""
    label = f"layer {name!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedLayerError(f"The `grouped` per-patient gradients refuse {label}: batch statistics mix sessions of different patients, so no row belongs to one patient; use GroupNorm.")
    if type(module) not in LAYER_GRADS:
        raise UnsupportedLayerError(
            f"The `grouped` per-patient gradients have no rule for {label}, which holds trainable parameters; "
            f"supported: {', '.join(t.__name__ for t in LAYER_GRADS)}. Set `training.per_patient_grads` to functorch or hooks."
        )
    if isinstance(module, nn.Conv1d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        raise UnsupportedLayerError(
            f"The `grouped` per-patient gradients need numeric zero padding in {label} (got padding={module.padding!r}, padding_mode={module.padding_mode!r}); "
            "set `training.per_patient_grads` to functorch or hooks."
        )
