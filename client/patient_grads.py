"""Per-patient gradients for patient-level DP-SGD: three interchangeable strategies.

A patient's loss is the mean of their (at most K) labelled sessions' losses, and DP-SGD needs
one gradient per *patient*, so each strategy returns, for a batch of B patients,
``grads[name]`` of shape (B, *param.shape) and the B patient losses. Opacus'
:class:`DPOptimizer` then clips each row to C and adds noise. All three give the same
gradients up to float rounding (tested to 1e-5 on every model variant).

* ``grouped`` (default: fastest on this model, ``fedrelapse bench dp-step``): no per-sample
  machinery. One ordinary forward pass of all B·K sessions, as session-major rows
  (:func:`session_rows`), keeps each trainable layer's input; one ``torch.autograd.grad`` of the
  summed patient losses gives the layers' output gradients (and no parameter gradients); then
  :mod:`client.layer_grads` contracts input and output gradient over each patient's own
  sessions (Linear: a ``bmm``; Conv1d: the ordinary weight-gradient convolution, once, with
  the patients as channel groups and the sessions as its batch, and inside the backward pass
  itself (:class:`_RowsInBackward`), where the same call also gives autograd the layer's input
  gradient; GroupNorm: likewise, PyTorch's group-norm backward once on the rows as K samples
  of B·C channels, with the forward pass's own statistics). Exact because sessions never interact (GroupNorm, never BatchNorm) and padded
  sessions get a zero output gradient from the masked loss; a probe on the first batch refuses
  a model whose forward mixes sessions anyway. A layer type without a rule is refused by name,
  and :func:`make_patient_grads` then warns and uses ``functorch``.
* ``functorch``: ``torch.func.vmap(grad_and_value(loss))`` over the patient dimension; the
  patient losses come with the gradients. Works for any layer torch.func can vmap; its
  vmapped Conv1d weight gradient is a grouped convolution, slow on CPU.
* ``hooks``: Opacus' :class:`GradSampleModule` forward and
  backward hooks give per-*session* gradients (B·K rows) of the sum over patients of their
  loss in one ordinary forward/backward pass. A session belongs to exactly one patient, so
  summing a patient's K rows gives exactly that patient's gradient. Conv1d rows come from
  :func:`conv1d_grad_sample` (one batched matmul per kernel tap) instead of Opacus' ``im2col``
  sampler, which took ~40 % of the DP step on CPU. The per-session rows cost the most of the
  three; kept as a cross-check.

Ghost clipping (Opacus' ``GradSampleModuleFastGradientClipping``) is not offered: its norms
are per batch row, i.e. per session here, and a per-patient norm needs the cross terms
between a patient's sessions; it also needs a second backward pass. ``fedrelapse bench
dp-step`` times Opacus' per-session ghost clipping on the same batch for reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from client.layer_grads import (
    FORWARD_STATE,
    LAYER_GRADS,
    UnsupportedLayerError,
    check_layer,
    conv1d_backward_with_patient_grads,
    conv1d_one_call,
    group_norm_backward_with_patient_grads,
    group_norm_one_call,
)

GRAD_STRATEGIES = ("grouped", "functorch", "hooks")
DEFAULT_GRADS = "grouped"


class PatientGrads(Protocol):
    def __call__(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """mel (B, K, n_mels, F), markers (B, K, M), y (B, K), m (B, K) -> ({name: (B, *shape)}, losses (B,))."""
        ...

    def close(self) -> None:
        """Leave the model exactly as it was (no hooks, no per-sample attributes)."""
        ...


def patient_loss_fn(model: nn.Module) -> Callable[..., torch.Tensor]:
    """loss(params, buffers, mel (K, n_mels, F), markers (K, M), y (K), m (K)) for ONE patient."""

    def loss(params: dict, buffers: dict, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, buffers), (mel, markers))  # (K,)
        per_session = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (per_session * m).sum() / m.sum().clamp(min=1.0)

    return loss


def session_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, K, *rest) per patient -> (K·B, *rest) session-major rows: row k·B + b is patient b's session k.

    A view when ``t``'s storage is (K, B, *rest), as :func:`client.dp_train._batch` lays a
    batch out; a copy otherwise. In this order a layer's rows are K blocks of all B patients,
    which is what lets :mod:`client.layer_grads` give a Conv1d's per-patient weight gradients
    in one call.
    """
    return t.transpose(0, 1).reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def patient_logits(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
    """mel (B, K, n_mels, F), markers (B, K, M) -> (B, K) logits: ``model`` run once over the
    batch's session-major rows (:func:`session_rows`)."""
    b, k = mel.shape[:2]
    return model(session_rows(mel), session_rows(markers)).view(k, b).t()  # (B, K)


def patient_losses(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, K) logits, labels, mask -> (B,) each patient's mean loss over their labelled sessions."""
    per = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (B, K)
    return (per * m).sum(1) / m.sum(1).clamp(min=1.0)


def conv1d_grad_sample(layer: nn.Conv1d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-row Conv1d gradients without im2col: one batched matmul per kernel tap.

    dW[n, o, c, j] = sum_l g[n, o, l] · x_pad[n, c, l·s + j·d]; shapes: x (N, C, L_in), g (N, O, L_out).
    Each tap's strided slice is made contiguous first (a strided bmm operand is ~8× slower on
    CPU). Layers this does not cover (groups, string padding, other padding modes) use Opacus'
    sampler.
    """
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)  # (N, C, L_in)
    (pad,), (stride,), (dil,), (k,) = layer.padding, layer.stride, layer.dilation, layer.kernel_size
    x = nn.functional.pad(x, (pad, pad))  # (N, C, L_in + 2·pad)
    span = stride * (backprops.shape[-1] - 1) + 1
    taps = [torch.bmm(backprops, x[..., j * dil : j * dil + span : stride].contiguous().transpose(1, 2)) for j in range(k)]  # k × (N, O, C)
    out = {layer.weight: torch.stack(taps, dim=-1)}  # (N, O, C, k)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(-1)  # (N, O)
    return out


class _SessionGradSampleModule(GradSampleModule):
    """Opacus' GradSampleModule with the faster Conv1d sampler (this class only; Opacus' registry is untouched)."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv1d: conv1d_grad_sample}


class FunctorchGrads:
    """``vmap(grad_and_value)`` over patients; the loss comes with the gradient."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        # randomness="different": each patient draws its own dropout masks (vmap refuses random ops otherwise)
        self.fn = vmap(grad_and_value(patient_loss_fn(model)), in_dims=(None, None, 0, 0, 0, 0), randomness="different")

    def __call__(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        grads, losses = self.fn(params, dict(self.model.named_buffers()), mel, markers, y, m)
        return grads, losses.detach()

    def close(self) -> None:
        return None


class LayerCall(NamedTuple):
    """One call of a trainable layer in the grouped forward pass, with its output's gradient once known."""

    layer: str
    module: nn.Module
    params: list[tuple[str, str]]  # (attribute, model parameter name)
    x: torch.Tensor  # the layer's input, rows N = K·B session-major
    version: int  # x._version when the layer read it
    output: torch.Tensor
    state: object  # what the layer's rule keeps from the forward pass (GroupNorm: its statistics); a layer whose backward forms its rows: its _Rows
    g: torch.Tensor | None = None  # d(Σ_p loss_p)/d(output), same shape as output


class _Rows:
    """What a layer whose backward forms its own rows (:class:`_RowsInBackward`) needs and leaves behind."""

    __slots__ = ("grads", "stats")

    def __init__(self, stats: object = None) -> None:
        self.grads: dict[str, torch.Tensor] = {}  # {attribute: (B, *shape)}, set by the backward pass
        self.stats = stats  # GroupNorm: the forward pass's (N, G) mean and rstd


class _RowsInBackward(torch.autograd.Function):
    """A layer's output (the forward pass's own, detached) whose backward is the layer's whole backward for `grouped`.

    For a Conv1d autograd would run the input-gradient convolution and the rule the per-patient
    weight-gradient convolution, two oneDNN calls; for a GroupNorm autograd's group-norm
    backward and the rule's sums each read x and g. Here one call gives both the input gradient
    and every patient's parameter gradients
    (:func:`client.layer_grads.conv1d_backward_with_patient_grads`,
    :func:`client.layer_grads.group_norm_backward_with_patient_grads`); the rows go to the
    call's :class:`_Rows` and the input gradient back into the graph. ``anchor`` (a scalar that
    requires grad, asked for in ``torch.autograd.grad``) makes autograd run this backward even
    where the layer's input needs no gradient (the first layer).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, call: LayerCall, b: int) -> torch.Tensor:  # type: ignore[override]
        ctx.x, ctx.call, ctx.b = x, call, b  # x kept unsaved: GroupedGrads checks its version itself, with the layer's name
        # The layer's output, detached: not an input of this function nor a view made here, so the
        # model may still change it in place (ReLU(inplace=True)) as it could the original.
        return call.output.detach()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        call = ctx.call
        GroupedGrads.check_input_unchanged(call)
        x, want_input = ctx.x.detach(), ctx.needs_input_grad[0]
        with torch.no_grad():
            if isinstance(call.module, nn.GroupNorm):
                gx, per = group_norm_backward_with_patient_grads(call.module, x, g, ctx.b, call.state.stats, input_grad=want_input)
            else:
                gx, per = conv1d_backward_with_patient_grads(call.module, x, g, ctx.b, input_grad=want_input)
        call.state.grads = per
        return gx, None, None, None


# Architectures whose probe (GroupedGrads.check_sessions_independent) passed in this process, so a
# site probes its model once, not at the start of every round's training (two extra forward
# passes, ≈ 0.08 ms a step of a 10-step round at small batches: `host_bound` in `fedrelapse bench
# dp-step`). Keyed by class and module tree (every layer and its settings). The probe guards
# against architectures that mix sessions (batch statistics, pooling or attention across the
# batch), which do so whatever their weights; it can only ever test the weights it runs with.
_INDEPENDENT_ROWS: set[tuple[object, ...]] = set()
_SETTING_TYPES = (bool, int, float, str, type(None))


def _architecture(model: nn.Module) -> tuple[object, ...]:
    """The model's class, its module tree (repr: every layer and its settings) and every module's
    plain attributes (flags and sizes its forward may read that its repr does not show)."""
    settings = tuple((name, tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, _SETTING_TYPES)))) for name, m in model.named_modules())
    return type(model), repr(model), settings


class GroupedGrads:
    """One ordinary forward and backward of all B·K sessions, then per-patient contractions per layer.

    Forward hooks keep each trainable layer's input and output; ``torch.autograd.grad`` of the
    summed patient losses gives the outputs' gradients (no parameter gradients are formed);
    :mod:`client.layer_grads` turns each layer's (input, output-gradient) pair into per-patient
    parameter gradients. Exact because a session's rows never meet another session's: the model
    has no batch statistics (:func:`client.layer_grads.check_layer` refuses BatchNorm) and the
    per-patient loss weights each session by its mask.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # trainable, in the model's order
        name_of = {id(p): n for n, p in model.named_parameters()}  # a tied parameter has one name
        self.layers: list[tuple[str, nn.Module, list[tuple[str, str]]]] = []  # (layer, module, [(attribute, parameter name)])
        for layer, module in model.named_modules():
            own = [(attr, name_of[id(p)]) for attr, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own or isinstance(module, nn.modules.batchnorm._BatchNorm):
                check_layer(layer or type(model).__name__, module)
            if own:
                self.layers.append((layer, module, own))
        self.calls: list[LayerCall] | None = None  # filled by the hooks during forward()
        self.anchor: torch.Tensor | None = None  # during forward(): the scalar that makes autograd run every _RowsInBackward
        self.b = 0  # during forward(): patients in the batch
        self.handles = [module.register_forward_hook(self._hook(layer, own)) for layer, module, own in self.layers]
        self.rows_checked = False

    def _hook(self, layer: str, own: list[tuple[str, str]]) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.calls is None:
                return
            if not args or not isinstance(output, torch.Tensor):
                raise UnsupportedLayerError(f"Layer {layer!r} must be called with its input as a positional tensor and return one tensor for the `grouped` per-patient gradients.")
            x = args[0]
            state = FORWARD_STATE[type(module)](module, output) if type(module) in FORWARD_STATE else None
            if self.anchor is not None and (conv1d_one_call(module, x) or group_norm_one_call(module, x, output, state)):
                call = LayerCall(layer, module, own, x, x._version, output, _Rows(state))
                self.calls.append(call)
                return _RowsInBackward.apply(x, self.anchor, call, self.b)  # the same values as output
            self.calls.append(LayerCall(layer, module, own, x, x._version, output, state))
            return None

        return hook

    def check_sessions_independent(self, rows_mel: torch.Tensor, rows_markers: torch.Tensor) -> None:
        """Refuse a model in which one session's output depends on another session of the batch.

        The per-patient rows are exact only if no operation mixes rows (no batch statistics,
        no attention or pooling across the batch); otherwise a patient's row would carry other
        patients' data and clipping it would not bound that patient's influence. Probe: two
        sessions of the rows (N, n_mels, F), (N, M), then the same two with the first one
        changed, under the same random state (dropout draws alike); the second session's output
        must not move.
        """
        rows_mel, rows_markers = rows_mel[:2], rows_markers[:2]  # (2, n_mels, F), (2, M)
        if rows_mel.shape[0] < 2:
            return
        changed_mel, changed_markers = rows_mel.clone(), rows_markers.clone()
        changed_mel[0], changed_markers[0] = changed_mel[0] * 3 + 1, changed_markers[0] * 3 + 1
        devices = [rows_mel.device.index or 0] if rows_mel.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            cpu_state = torch.random.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(devices[0]) if devices else None
            first = self.model(rows_mel, rows_markers)  # (2,)
            torch.random.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, devices[0])
            second = self.model(changed_mel, changed_markers)  # (2,)
        if not torch.allclose(first[1], second[1], rtol=1e-5, atol=1e-6, equal_nan=True):
            raise UnsupportedLayerError(
                f"{type(self.model).__name__} mixes sessions within a batch (changing one session changed another's output), so the `grouped` "
                "per-patient gradients would not be one patient's alone; set `training.per_patient_grads` to functorch."
            )
        self.rows_checked = bool(torch.isfinite(first).all())  # a diverged model's NaN outputs prove nothing: probe again next step

    def forward_backward(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[list[LayerCall], torch.Tensor]:
        """The ordinary pass: every trainable layer call with its output gradient, and the (B,) patient losses."""
        if not self.rows_checked:
            architecture = _architecture(self.model)
            if architecture in _INDEPENDENT_ROWS:
                self.rows_checked = True
            else:
                self.check_sessions_independent(session_rows(mel), session_rows(markers))  # (K·B, n_mels, F), (K·B, M)
                if self.rows_checked:
                    _INDEPENDENT_ROWS.add(architecture)
        self.calls, self.b = [], y.shape[0]
        self.anchor = anchor = mel.new_zeros((), dtype=torch.float32, requires_grad=torch.is_grad_enabled())  # every _RowsInBackward (Conv1d, GroupNorm) hangs on it
        try:
            logits = patient_logits(self.model, mel, markers)  # (B, K)
        finally:
            calls, self.calls, self.anchor = self.calls, None, None
        losses = patient_losses(logits, y, m)  # (B,)
        missing = sorted({layer for layer, _, _ in self.layers} - {c.layer for c in calls})
        if missing:
            raise UnsupportedLayerError(f"Trainable layer(s) {', '.join(map(repr, missing))} took no part in the forward pass as modules; the `grouped` per-patient gradients cannot see them. Set `training.per_patient_grads` to functorch.")
        # d(Σ_p loss_p)/d(output): row n is the gradient of its own patient's loss alone. A one-call
        # Conv1d or GroupNorm needs no output gradient here: its _RowsInBackward forms its rows during this pass.
        ruled = [c for c in calls if not isinstance(c.state, _Rows)]
        g_outs = torch.autograd.grad(losses.sum(), [c.output for c in ruled] + [anchor], allow_unused=True)[: len(ruled)]
        g_of = {id(c): g for c, g in zip(ruled, g_outs, strict=True)}
        return [c._replace(g=g_of[id(c)]) if id(c) in g_of else c for c in calls], losses.detach()

    @staticmethod
    def check_input_unchanged(call: LayerCall) -> None:
        if call.x._version != call.version:
            raise UnsupportedLayerError(f"The input of layer {call.layer!r} was changed in place after the layer read it (e.g. ReLU(inplace=True)); the `grouped` per-patient gradients need it unchanged.")

    @staticmethod
    def contract(call: LayerCall, b: int) -> dict[str, torch.Tensor]:
        """One layer call's per-patient gradients, {attribute: (B, *shape)} (empty if its output did not reach the loss)."""
        GroupedGrads.check_input_unchanged(call)
        if isinstance(call.state, _Rows):  # formed during the backward pass
            return call.state.grads
        if call.g is None:
            return {}
        with torch.no_grad():  # plain tensors out: nothing here is differentiated again
            return LAYER_GRADS[type(call.module)](call.module, call.x.detach(), call.g, b, call.state)

    def __call__(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        b = y.shape[0]
        calls, losses = self.forward_backward(mel, markers, y, m)
        grads: dict[str, torch.Tensor] = {}
        for call in calls:
            per = self.contract(call, b)
            for attr, name in call.params:
                if attr in per:
                    grads[name] = grads[name] + per[attr] if name in grads else per[attr]
        return {n: grads[n].to(p.dtype) if n in grads else p.new_zeros((b, *p.shape)) for n, p in self.params.items()}, losses

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.calls = [], None


class HookGrads:
    """Opacus per-sample hooks on the flattened sessions, summed per patient."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # loss_reduction="sum": row i's grad_sample is d(sum of patient losses)/dθ from session i alone.
        self.gsm = _SessionGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)

    def __call__(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        b, k = y.shape
        for _, p in self.named:
            p.grad_sample = None
            p.grad = None  # the backward assigns a fresh summed gradient (unused) instead of adding into the last step's
        logits = patient_logits(self.gsm, mel, markers)  # (B, K)
        losses = patient_losses(logits, y, m)  # (B,)
        with warnings.catch_warnings():  # the first layer's input needs no grad; torch says so each step
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        grads = {n: p.grad_sample.view(k, b, *p.shape).sum(0) for n, p in self.named}  # (B, *shape): session-major rows
        for _, p in self.named:
            p.grad_sample = None
            p.grad = None  # the ordinary summed gradient is not used
        return grads, losses.detach()

    def close(self) -> None:
        self.gsm.cleanup()  # removes the hooks and every per-sample attribute Opacus added


def make_patient_grads(model: nn.Module, *, strategy: str) -> PatientGrads:
    if strategy == "hooks":
        return HookGrads(model)
    if strategy == "functorch":
        return FunctorchGrads(model)
    if strategy == "grouped":
        try:
            return GroupedGrads(model)
        except UnsupportedLayerError as e:
            warnings.warn(f"{e} Falling back to the functorch per-patient gradients (same result, slower).", RuntimeWarning, stacklevel=2)
            return FunctorchGrads(model)
    raise ValueError(f"Unknown per-patient gradient strategy {strategy!r}; choose one of {', '.join(GRAD_STRATEGIES)}.")
