"""Per-patient gradients for patient-level DP-SGD: three interchangeable strategies.

A patient's loss is the mean of their (at most K) labelled sessions' losses, and DP-SGD needs
one gradient per *patient*, so each strategy returns, for a batch of B patients,
``grads[name]`` of shape (B, *param.shape) and the B patient losses. Opacus'
:class:`DPOptimizer` then clips each row to C and adds noise. All three give the same
gradients up to float rounding (tested to 1e-5 on every model variant).

* ``grouped`` (default: fastest on this model, ``fedrelapse bench dp-step``): no per-sample
  machinery. One ordinary forward pass of all B·K sessions, as session-major rows
  (:func:`session_rows`), in which every trainable layer holds B copies of its parameters, one
  per patient, each applied to its patient's rows only (:mod:`client.patient_layers`: a Conv1d
  is one convolution with the patients as channel groups, a GroupNorm one group norm with the
  patients' groups side by side, a Linear one batched matmul); one ``torch.autograd.grad`` of
  the summed patient losses with respect to the copies then gives each patient's gradient in
  autograd's ordinary backward pass, with the ordinary backward kernels. Exact because sessions
  never interact (GroupNorm, never BatchNorm) and padded sessions get a zero output gradient
  from the masked loss; a probe on the first batch (once per architecture and process)
  refuses a model whose forward mixes sessions anyway, or that calls a trainable layer on
  anything but the batch's rows in order (each patient's copies must meet their own rows). A
  layer type without a per-patient form is refused by name, and :func:`make_patient_grads`
  then warns and uses ``functorch``; :func:`client.dp_train.train_dp` does the same when the
  probes refuse the model.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from client.patient_layers import PATIENT_LAYERS, PatientLayer, UnsupportedLayerError, check_layer, check_rows

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
    which is what lets :mod:`client.patient_layers` run a Conv1d with the patients as channel
    groups without a copy.
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


def conv1d_grad_sample(layer: nn.Conv1d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
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


# Architectures whose probes (GroupedGrads.check_sessions_independent, .check_copies_follow_their_rows)
# passed in this process, so a site probes its model once, not at the start of every round's
# training (six small forward passes: 0.66 + 1.74 ms on the `host_bound` step of `fedrelapse bench
# dp-step`, 1 thread, i.e. 0.24 ms a step of a 10-step round). Keyed by class and module tree
# (every layer and its settings). The probes guard
# against architectures that mix sessions (batch statistics, pooling or attention across the
# batch) or call a trainable layer on anything but the batch's rows in order, which they do
# whatever their weights; a probe can only ever test the weights it runs with.
_INDEPENDENT_ROWS: set[tuple[object, ...]] = set()
_SETTING_TYPES = (bool, int, float, str, type(None))


def _architecture(model: nn.Module) -> tuple[object, ...]:
    """The model's class, its module tree (repr: every layer and its settings) and every module's
    plain attributes (flags and sizes its forward may read that its repr does not show)."""
    settings = tuple((name, tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, _SETTING_TYPES)))) for name, m in model.named_modules())
    return type(model), repr(model), settings


@contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Inside the block: no autocast on ``device`` and, on CUDA, no TF32 in convolutions or matmuls (a probe
    that compares two ways of computing the same outputs needs them to agree to float32 rounding)."""
    cuda = device.type == "cuda"
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) if cuda else None
    if saved is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _Layer(NamedTuple):
    """A layer with trainable parameters, and what its per-patient call needs."""

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (attribute, parameter): every parameter the layer holds, trainable or frozen


class _Pass:
    """One per-patient forward pass: the batch's sizes, every parameter's per-patient copies, each layer call's input."""

    __slots__ = ("b", "rows", "copies", "inputs")

    def __init__(self, b: int, rows: int, copies: dict[nn.Parameter, torch.Tensor]) -> None:
        self.b, self.rows, self.copies = b, rows, copies  # copies: {parameter: B copies in its layer kernel's shape}
        self.inputs: list[tuple[str, torch.Tensor, int]] = []  # (layer, input, its version when read), to name a layer whose input changes in place


class GroupedGrads:
    """One ordinary forward and backward pass of all B·K sessions with one copy of each trainable parameter per patient.

    While it runs, each trainable layer's call is its per-patient form
    (:mod:`client.patient_layers`: the same output, from B stacked copies of its parameters, each
    applied to its patient's rows); one ``torch.autograd.grad`` of the summed patient losses with
    respect to the copies gives every patient's gradient, (B, *shape) per parameter, in autograd's
    own backward pass (no hooks, nothing in Python per layer). Exact because a session's rows never
    meet another session's: no batch statistics (:func:`client.patient_layers.check_layer` refuses
    BatchNorm; a probe refuses any other mixing) and the per-patient loss weights each session by
    its mask; a second probe checks that each patient's copies meet that patient's rows and no
    other's. A copy that no layer call used gets a zero gradient; a trainable parameter used
    outside its layer's call is refused by name.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # trainable, in the model's order
        self.layers: list[_Layer] = []
        for layer, module in model.named_modules():
            own = list(module.named_parameters(recurse=False))
            if any(p.requires_grad for _, p in own) or isinstance(module, nn.modules.batchnorm._BatchNorm):
                check_layer(layer or type(model).__name__, module)
                self.layers.append(_Layer(layer, module, own))
        # How each parameter of those layers is copied per patient: the form of the layer that holds it, and its attribute there.
        self.plan: dict[nn.Parameter, tuple[type[PatientLayer], str]] = {}
        for layer in self.layers:
            for attr, p in layer.params:
                form = (PATIENT_LAYERS[type(layer.module)], attr)
                if self.plan.setdefault(p, form) != form:
                    raise UnsupportedLayerError(f"A parameter of layer {layer.name!r} is shared with a layer of another kind or role; the `grouped` per-patient gradients need one per-patient form for it. Set `training.per_patient_grads` to functorch.")
        self._pass: _Pass | None = None  # set while the per-patient forward pass runs
        self._forwards = [(layer.module.__dict__, self._call(layer)) for layer in self.layers]  # the per-patient forward each layer takes for that pass
        self.rows_checked = False

    def _call(self, layer: _Layer) -> Callable[..., torch.Tensor]:
        name, module, params = layer
        form = PATIENT_LAYERS[type(module)]
        per_patient, min_dim = form.forward, form.min_dim

        def forward(*args: object, **kwargs: object) -> torch.Tensor:
            run = self._pass
            if run is None:
                raise UnsupportedLayerError(f"Layer {name!r} was called with its per-patient form outside a `grouped` forward pass (from another thread, or after close()); run the model on its own there.")
            x = args[0] if len(args) == 1 and not kwargs else kwargs.get("input") if not args and len(kwargs) == 1 else None
            if not isinstance(x, torch.Tensor):
                raise UnsupportedLayerError(f"Layer {name!r} must be called with its input as its one tensor argument for the `grouped` per-patient gradients. Set `training.per_patient_grads` to functorch.")
            if x.dim() < min_dim or x.shape[0] != run.rows:
                check_rows(module, x, run.rows, min_dim=min_dim)  # raises, naming the shapes
            run.inputs.append((name, x, x._version))
            copies = run.copies
            return per_patient(module, x, {attr: copies[p] for attr, p in params}, run.b)

        return forward

    @contextmanager
    def _per_patient(self, run: _Pass) -> Iterator[None]:
        """Every trainable layer runs its per-patient form with ``run``'s copies inside the block, and its own forward again after it, whatever happens."""
        if any("forward" in module_dict for module_dict, _ in self._forwards):
            raise UnsupportedLayerError("A trainable layer got its own `forward` set on the instance after the `grouped` per-patient gradients were set up; the per-patient form would bypass it. Set `training.per_patient_grads` to functorch.")
        self._pass = run
        for module_dict, forward in self._forwards:
            module_dict["forward"] = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
        try:
            yield
        finally:
            for module_dict, _ in self._forwards:
                module_dict.pop("forward", None)
            self._pass = None

    def check_sessions_independent(self, rows_mel: torch.Tensor, rows_markers: torch.Tensor) -> bool:
        """Refuse a model in which one session's output depends on another session of the batch.

        The per-patient rows are exact only if no operation mixes rows (no batch statistics,
        no attention or pooling across the batch); otherwise a patient's row would carry other
        patients' data and clipping it would not bound that patient's influence. Probe: two
        sessions of the rows (N, n_mels, F), (N, M), then the same two with the first one
        changed, under the same random state (dropout draws alike); the second session's output
        must not move. Returns False when inconclusive (fewer than 2 rows, or outputs that are not
        finite: a diverged model's NaN outputs prove nothing), to probe again on a later batch.
        """
        rows_mel, rows_markers = rows_mel[:2], rows_markers[:2]  # (2, n_mels, F), (2, M)
        if rows_mel.shape[0] < 2:
            return False
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
        return bool(torch.isfinite(first).all())

    def check_copies_follow_their_rows(self, rows_mel: torch.Tensor, rows_markers: torch.Tensor) -> bool:
        """Refuse a model in which a trainable layer's per-patient copies would not meet their own patient's rows.

        The per-patient forms give row n = k·B + b patient b's copy; a layer called on anything
        else (a tensor not made of the batch's rows whose first dimension happens to be B·K, such as
        time-major activations or positions shared by every row, or rows in another order) would
        charge one patient's rows to another patient's copy and clip the wrong gradient. Probe: up
        to 3 rows as one session each of 3 patients, patient i > 0's copies the parameters plus
        their own random perturbation (a tenth of each parameter's mean size), dropout off and
        every other module in its training mode, in full float32 (no autocast, no TF32: the
        per-patient and the ordinary kernels must agree to rounding); row i's output must equal
        the ordinary model's with patient i's parameters on row i alone. It covers the code path
        it runs: the training forward of ≤ 3 rows. Returns False when inconclusive (fewer than 2
        rows, or outputs that are not finite), to probe again on a later batch.
        """
        n = min(3, rows_mel.shape[0])
        if n < 2:
            return False
        rows_mel, rows_markers = rows_mel[:n], rows_markers[:n]  # (n, n_mels, F), (n, M)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        generator = torch.Generator().manual_seed(0)
        per_patient = [{p: p.detach() for p in self.plan}] + [
            {p: p.detach() + 0.1 * (p.detach().abs().mean() + 1e-3) * torch.randn(p.shape, generator=generator).to(p) for p in self.plan} for _ in range(n - 1)
        ]  # patient i's parameters
        dropout = [(m, m.training) for m in self.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        for m, _ in dropout:
            m.training = False  # the same outputs in both passes; every other module keeps its mode, and its training-only branches are probed
        try:
            with torch.no_grad(), _full_float32(rows_mel.device):
                copies = {p: form.copies(attr, [own[p] for own in per_patient]) for p, (form, attr) in self.plan.items()}
                with self._per_patient(_Pass(n, n, copies)):
                    together = self.model(rows_mel, rows_markers).reshape(n, -1)  # (n, outputs)
                alone = torch.cat([
                    functional_call(self.model, {name: own.get(p, p) for name, p in named.items()}, (rows_mel[i : i + 1], rows_markers[i : i + 1])).reshape(1, -1)
                    for i, own in enumerate(per_patient)
                ])  # (n, outputs)
        finally:
            for m, mode in dropout:
                m.training = mode
        if not (torch.isfinite(together).all() and torch.isfinite(alone).all()):
            return False
        if not torch.allclose(together, alone, rtol=1e-4, atol=1e-5):
            raise UnsupportedLayerError(
                f"{type(self.model).__name__} does not give each patient's rows their own parameter copies: a trainable layer is called on something other "
                "than the batch's session rows in their order (e.g. time-major activations, a tensor shared by every row, rows reordered), or a layer's "
                "parameters are used outside its call. The `grouped` per-patient gradients would then mix patients; set `training.per_patient_grads` to functorch."
            )
        return True

    def _check_rows(self, mel: torch.Tensor, markers: torch.Tensor) -> None:
        """Probe once per architecture per process (:data:`_INDEPENDENT_ROWS`) that sessions stay apart and copies meet their own rows.

        ``rows_checked`` is True only once both probes passed: a refused model is refused again at its next step.
        """
        architecture = _architecture(self.model)
        if architecture not in _INDEPENDENT_ROWS:
            rows_mel, rows_markers = session_rows(mel), session_rows(markers)  # (K·B, n_mels, F), (K·B, M)
            if not (self.check_sessions_independent(rows_mel, rows_markers) and self.check_copies_follow_their_rows(rows_mel, rows_markers)):
                return  # inconclusive: probe again on the next batch
            _INDEPENDENT_ROWS.add(architecture)
        self.rows_checked = True

    def forward(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], _Pass]:
        """The per-patient forward pass: the (B,) patient losses (with their graph), {name: B copies} of each trainable parameter (the leaves), and the pass."""
        if not self.rows_checked:
            self._check_rows(mel, markers)
        b, k = y.shape
        with torch.no_grad():  # B copies of every layer parameter, in its kernel's shape; the trainable ones' become the leaves
            copies = {p: form.copies(attr, [p] * b) for p, (form, attr) in self.plan.items()}
        leaves = {n: copies[p].requires_grad_() for n, p in self.params.items()}
        run = _Pass(b, b * k, copies)
        with self._per_patient(run):
            logits = patient_logits(self.model, mel, markers)  # (B, K)
        return patient_losses(logits, y, m), leaves, run

    def __call__(self, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        losses, leaves, run = self.forward(mel, markers, y, m)  # (B,), {name: (B, *shape)}
        names, params = list(self.params), list(self.params.values())
        # The real parameters are asked for too: a gradient reaching one means it was used outside its layer's call, where no copy stood in for it.
        try:
            grads = torch.autograd.grad(losses.sum(), [*(leaves[n] for n in names), *params], allow_unused=True)
        except RuntimeError as e:
            changed = list(dict.fromkeys(layer for layer, x, version in run.inputs if x._version != version))
            if changed and "modified by an inplace operation" in str(e):
                raise UnsupportedLayerError(
                    f"The input of layer {', '.join(map(repr, changed))} was changed in place after the layer read it (e.g. ReLU(inplace=True)), and the backward pass "
                    "needed it unchanged; make that operation out of place, or set `training.per_patient_grads` to functorch."
                ) from e
            raise
        bypassed = [n for n, g in zip(names, grads[len(names):], strict=True) if g is not None]
        if bypassed:
            raise UnsupportedLayerError(f"Parameter(s) {', '.join(map(repr, bypassed))} reached the loss outside a call of their layer as a module; the `grouped` per-patient gradients cannot see that use. Set `training.per_patient_grads` to functorch.")
        rows = {}
        for (n, p), g in zip(self.params.items(), grads, strict=False):
            form, attr = self.plan[p]
            rows[n] = form.rows(attr, g, run.b) if g is not None else p.new_zeros((run.b, *p.shape))  # (B, *shape)
        return rows, losses.detach()

    def close(self) -> None:
        self._forwards, self._pass = [], None


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
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' per-sample attribute, not in torch's stubs
            p.grad = None  # the backward assigns a fresh summed gradient (unused) instead of adding into the last step's
        logits = patient_logits(self.gsm, mel, markers)  # (B, K)
        losses = patient_losses(logits, y, m)  # (B,)
        with warnings.catch_warnings():  # the first layer's input needs no grad; torch says so each step
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        grads = {n: p.grad_sample.view(k, b, *p.shape).sum(0) for n, p in self.named}  # type: ignore[attr-defined]  # (B, *shape): session-major rows; grad_sample: Opacus'
        for _, p in self.named:
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' per-sample attribute, not in torch's stubs
            p.grad = None  # the ordinary summed gradient is not used
        return grads, losses.detach()

    def close(self) -> None:
        self.gsm.cleanup()  # removes the hooks and every per-sample attribute Opacus added


def functorch_fallback(model: nn.Module, refusal: UnsupportedLayerError, *, stacklevel: int) -> FunctorchGrads:
    """Warn (with why `grouped` refused the model) and return the ``functorch`` strategy for it: the same patient-level gradients, slower."""
    warnings.warn(f"{refusal} Falling back to the functorch per-patient gradients (same result, slower).", RuntimeWarning, stacklevel=stacklevel)
    return FunctorchGrads(model)


def make_patient_grads(model: nn.Module, *, strategy: str) -> PatientGrads:
    if strategy == "hooks":
        return HookGrads(model)
    if strategy == "functorch":
        return FunctorchGrads(model)
    if strategy == "grouped":
        try:
            return GroupedGrads(model)
        except UnsupportedLayerError as e:
            return functorch_fallback(model, e, stacklevel=3)
    raise ValueError(f"Unknown per-patient gradient strategy {strategy!r}; choose one of {', '.join(GRAD_STRATEGIES)}.")
