"""Per-patient parameter gradients of one layer from its input and its output's gradient.

The ``grouped`` strategy of :mod:`client.patient_grads` runs one ordinary forward and backward
pass over all B·K sessions of a batch, keeping each trainable layer's input ``x`` (rows
N = B·K, patient-major) and the gradient ``g`` of the summed patient losses with respect to
the layer's output. A session's rows touch no other session's, so ``g`` row n is the gradient
of its own patient's loss alone, and a patient's parameter gradient is the contraction of
``x`` and ``g`` over that patient's K sessions (and positions): the same multiply-adds as the
ordinary weight gradient, grouped by patient instead of summed over the batch. Padded
sessions carry ``g = 0`` (their loss weight is 0), exactly as in the patient's loss.

Each function returns ``{attribute: (B, *param.shape)}`` for the layer's trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LayerGrads = Callable[..., dict[str, torch.Tensor]]  # (layer, x, g, B[, forward state]) -> {attribute: (B, *shape)}
ForwardState = Callable[[nn.Module, torch.Tensor], object]  # (layer, output) -> what the rule needs from the forward pass


class UnsupportedLayerError(ValueError):
    """The ``grouped`` strategy has no exact per-patient rule for a layer of the model."""


def linear_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, state: None = None) -> dict[str, torch.Tensor]:
    """x (N, *, in), g (N, *, out) -> weight (B, out, in) = Σ over a patient's rows of g xᵀ; bias (B, out)."""
    assert isinstance(layer, nn.Linear)
    g = g.reshape(b, -1, layer.out_features)  # (B, K·S, out)
    out = {}
    if layer.weight.requires_grad:
        out["weight"] = torch.bmm(g.transpose(1, 2), x.reshape(b, -1, layer.in_features).to(g.dtype))  # (B, out, in)
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = g.sum(1)  # (B, out)
    return out


# Up to this many per-session weight-gradient values (N sessions × the weight's numel) a conv
# layer's per-patient weight gradients come from ONE grouped call over all sessions
# (:func:`_per_session_conv1d_weight`), summed per patient; above it (wide layers, where the
# (N, *weight) rows would take memory), one call per patient. Measured on the 2-core AMD EPYC
# in the default model (8 patients × 12 sessions, ms, min of 30, 2 / 1 torch threads): first
# conv (32 → 16 channels, 600 frames) 1.49-1.57 vs 1.78-2.12 per patient / 3.0 vs 3.0; second
# conv (16 → 16, 300 frames) 0.57 vs 0.70-0.72 with the earlier patients-as-groups call /
# 0.70 vs 0.76. On a GPU it is one kernel call instead of B.
SESSION_ROWS_AT_MOST = 1 << 22


def _per_session_conv1d_weight(layer: nn.Conv1d, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: int) -> torch.Tensor:
    """x (N, C, L_in), g (N, O, L_out) -> (B, O, C/groups, k) from ONE weight-gradient call.

    Sessions become channel groups of a batch of one: a convolution of (1, N·C, L_in) with
    N·groups groups has weight (N·O, C/groups, k), whose block n is session n's own weight
    gradient (no copy of x or g: patient-major rows are already channel blocks); the K blocks
    of each patient are then summed.
    """
    n = x.shape[0]
    args = (layer.stride, layer.padding, layer.dilation, False, (0,), layer.groups * n, (False, True, False))
    # The weight only gives the shape here: its values enter the input's gradient, which is not asked for.
    shape_only = w.new_empty((n * w.shape[0], *w.shape[1:]))  # (N·O, C/groups, k)
    rows = torch.ops.aten.convolution_backward(g.reshape(1, -1, g.shape[-1]), x.reshape(1, -1, x.shape[-1]), shape_only, None, *args)[1]  # (N·O, C/groups, k)
    return rows.view(b, n // b, *w.shape).sum(1, dtype=torch.promote_types(rows.dtype, torch.float32))  # (B, O, C/groups, k); bf16 rows summed in float32


def conv1d_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int, state: None = None, *, per_session: bool | None = None) -> dict[str, torch.Tensor]:
    """x (N, C, L_in), g (N, O, L_out) -> weight (B, O, C/groups, k); bias (B, O).

    The ordinary weight-gradient convolution (the kernel the plain backward pass uses, as in
    ``torch.nn.grad.conv1d_weight``), either once over all sessions as channel groups
    (:func:`_per_session_conv1d_weight`, while the per-session rows stay under
    :data:`SESSION_ROWS_AT_MOST` values) or once per patient over their K sessions;
    ``per_session`` forces either way. A vmapped (grouped) convolution or an im2col matmul
    costs 3-4× the batch's single weight gradient on CPU; these cost 1.1-1.3×.
    """
    assert isinstance(layer, nn.Conv1d)
    if x.dim() != 3:
        raise UnsupportedLayerError(f"Conv1d got an input of shape {tuple(x.shape)}; the `grouped` per-patient gradients need batched (N, C, L) inputs.")
    gs = g.unflatten(0, (b, -1))  # (B, K, O, L_out)
    out = {}
    if layer.weight.requires_grad:
        x = x.to(g.dtype).contiguous()  # (N, C, L_in)
        w = layer.weight.detach().to(g.dtype)
        if per_session if per_session is not None else x.shape[0] * w.numel() <= SESSION_ROWS_AT_MOST:
            out["weight"] = _per_session_conv1d_weight(layer, x, g.contiguous(), w, b)
        else:
            xs = x.unflatten(0, (b, -1))  # (B, K, C, L_in)
            args = (layer.stride, layer.padding, layer.dilation, False, (0,), layer.groups, (False, True, False))
            # the op behind torch.nn.grad.conv1d_weight, called directly: its Python wrapper costs ~10 µs × B × layers per step
            out["weight"] = torch.stack([torch.ops.aten.convolution_backward(gs[i], xs[i], w, None, *args)[1] for i in range(b)])  # (B, O, C/groups, k)
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = gs.sum((1, 3))  # (B, O)
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
        out["weight"] = sum_gxhat.view(b, -1, c).sum(1)  # (B, C)
    if layer.bias is not None and layer.bias.requires_grad:
        out["bias"] = sum_g.view(b, -1, c).sum(1)  # (B, C)
    return out


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
