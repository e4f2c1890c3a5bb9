"""The `grouped` per-patient gradients: one ordinary forward/backward, exact per-patient rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client import patient_grads
from client.patient_grads import GroupedGrads, make_patient_grads, session_rows
from client.patient_layers import UnsupportedLayerError
from shared.config import ModelSpec
from shared.markers import N_MODEL_MARKERS
from shared.models.prosody_mel import ProsodyMelNet

B, K, N_MELS, F, SPEECH = 5, 3, 8, 20, 6


@pytest.fixture(autouse=True)
def fresh_probe_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's models are probed as a site's first round would probe them (no architecture remembered from another test)."""
    monkeypatch.setattr(patient_grads, "_INDEPENDENT_ROWS", set())


def batch(n_markers: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, K, N_MELS, F, generator=g)  # (B, K, n_mels, F)
    markers = torch.randn(B, K, n_markers, generator=g)  # (B, K, M)
    y = (torch.rand(B, K, generator=g) > 0.5).float()  # (B, K)
    m = torch.ones(B, K)
    m[0, 1:] = 0  # one labelled session: it weighs 3× more than each of a full patient's
    m[2] = 0  # no labelled session at all: zero gradient, zero loss
    return mel, markers, y, m


def per_patient(model: nn.Module, strategy: str, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    grads = make_patient_grads(model, strategy=strategy)
    try:
        return grads(*inputs)
    finally:
        grads.close()


def assert_same_as_functorch(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    grouped, losses = per_patient(model, "grouped", inputs)
    reference, ref_losses = per_patient(model, "functorch", inputs)
    assert grouped.keys() == reference.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, ref in reference.items():
        torch.testing.assert_close(grouped[name], ref, rtol=1e-5, atol=1e-6, msg=f"grouped vs functorch: {name}")
    torch.testing.assert_close(losses, ref_losses)
    assert not any(g.requires_grad for g in grouped.values()) and not losses.requires_grad  # plain tensors, no graph kept
    assert all(float(g[2].abs().max()) == 0.0 for g in grouped.values())  # the patient with no labelled session


@pytest.mark.parametrize("branches", ["fused", "acoustic", "language"])
@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("speech", [False, True])
def test_grouped_equals_functorch_on_every_model_variant(branches: str, baseline: bool, speech: bool) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(hidden=8, conv_channels=4, groups=2, branches=branches, personal_baseline=baseline)
    model = ProsodyMelNet(spec, n_mels=N_MELS, n_markers=N_MODEL_MARKERS, speech_dim=SPEECH if speech else 0, adapter_dim=4 if speech else 0)
    assert_same_as_functorch(model, batch(N_MODEL_MARKERS + (SPEECH if speech else 0)))


class Odd(nn.Module):
    """Layers off the default model's path: grouped/dilated conv without bias, a GroupNorm on
    (N, C, H, W)-shaped rows, a frozen layer, and one Linear called twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, 6, kernel_size=3, stride=3, padding=1, dilation=2, groups=2, bias=False)
        self.norm = nn.GroupNorm(3, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)
        self.out.bias.requires_grad_(False)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = self.conv(mel)  # (N, 6, L)
        h = self.norm(h.unflatten(-1, (1, -1))).flatten(-2).relu().mean(-1)  # (N, 6)
        h = self.shared(torch.tanh(self.shared(self.frozen(h))))  # (N, 6)
        return self.out(h).squeeze(-1) + markers[:, 0]  # (N,)


def test_grouped_equals_functorch_on_grouped_dilated_conv_shared_and_frozen_layers() -> None:
    torch.manual_seed(1)
    model = Odd()
    assert_same_as_functorch(model, batch(N_MODEL_MARKERS, seed=3))
    assert "frozen.weight" not in per_patient(model, "grouped", batch(N_MODEL_MARKERS))[0]


def test_grouped_leaves_no_hook_behind_and_the_model_trains_normally() -> None:
    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    per_patient(model, "grouped", batch(N_MODEL_MARKERS))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())  # only the copies' gradients were formed
    assert not any("forward" in vars(module) for module in model.modules())  # every layer has its own forward back
    mel, markers, _, _ = batch(N_MODEL_MARKERS)
    model(mel[0], markers[0]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(N_MELS)
        self.out = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(mel).mean(-1)).squeeze(-1)


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(N_MELS, 4, batch_first=True)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.rnn(mel.transpose(1, 2))[0][:, -1].sum(-1)


@pytest.mark.parametrize(("model", "message"), [
    (WithBatchNorm, r"refuse layer 'bn' \(BatchNorm1d\): batch statistics mix sessions"),
    (WithLSTM, r"no rule for layer 'rnn' \(LSTM\)"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3)), r"no rule for layer '0' \(Conv2d\)"),
])
def test_grouped_names_the_layer_it_cannot_handle_and_the_factory_falls_back(model: type[nn.Module], message: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=message):
        GroupedGrads(model())
    with pytest.warns(RuntimeWarning, match="Falling back to the functorch"):
        fallback = make_patient_grads(model(), strategy="grouped")
    assert not isinstance(fallback, GroupedGrads)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(N_MELS, 4), nn.Linear(4, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = self.a(mel.mean(-1))
        out = self.b(h)
        h.mul_(0)  # after b read it: b's kept input no longer is what b saw
        return out.squeeze(-1)


class Bypass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(mel.mean(-1), self.a.weight, self.a.bias).squeeze(-1)  # not through the module


def test_grouped_refuses_inputs_changed_in_place_and_layers_bypassed() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"input of layer 'b' was changed in place"):
        per_patient(InPlace(), "grouped", batch(N_MODEL_MARKERS))
    with pytest.raises(UnsupportedLayerError, match=r"Bypass does not give each patient's rows their own parameter copies: .* or a layer's parameters are used outside its call"):
        per_patient(Bypass(), "grouped", batch(N_MODEL_MARKERS))  # the first step's probe
    grouped = GroupedGrads(Bypass())
    grouped.rows_checked = True  # without the probe, the step itself refuses
    with pytest.raises(UnsupportedLayerError, match=r"'a.weight', 'a.bias' reached the loss outside a call of their layer"):
        grouped(*batch(N_MODEL_MARKERS))


@pytest.mark.parametrize("layer", [
    nn.Linear(9, 4),
    nn.Linear(9, 4, bias=False),
    nn.Conv1d(6, 4, 5, stride=2, padding=2),
    nn.Conv1d(6, 4, 3, stride=3, padding=1, dilation=2, groups=2, bias=False),
    nn.Conv1d(6, 4, 3, padding="same", dilation=2),
    nn.Conv1d(6, 4, 3, padding=2, padding_mode="circular"),
    nn.Conv1d(6, 4, 3, padding=1, padding_mode="reflect"),
    nn.GroupNorm(2, 6),
    nn.LayerNorm(9),
    nn.LayerNorm((6, 9)),
], ids=lambda layer: repr(layer))
def test_each_per_patient_layer_gives_the_ordinary_output_and_per_patient_gradients(layer: nn.Module) -> None:
    """A layer's per-patient form: with every copy equal to the layer's parameters, the ordinary
    output; the gradient of each copy is that patient's own (the ordinary gradient of their rows alone)."""
    from client.patient_layers import PATIENT_LAYERS, patient_forward

    torch.manual_seed(2)
    b, k = 3, 4
    form = PATIENT_LAYERS[type(layer)]
    for shape in [(k * b, 6, 9)] + ([(k * b, 9), (k * b, 2, 3, 9)] if isinstance(layer, nn.Linear) else []):  # session-major rows; a Linear also on (N, in) and (N, S, T, in)
        x = torch.randn(shape) * 2 + 1
        with torch.no_grad():
            copies = {a: form.copies(a, [p] * b).requires_grad_() for a, p in layer.named_parameters()}
        out = patient_forward(layer, x, copies, b, k * b)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        g[(k - 1) * b + 1] = 0  # a padded (last) session of patient 1
        rows = {a: form.rows(a, r, b) for a, r in zip(copies, torch.autograd.grad(out, list(copies.values()), g), strict=True)}  # (B, *shape)
        for i in range(b):  # patient i's rows are x[i::b]
            own = torch.autograd.grad(layer(x[i::b]), list(dict(layer.named_parameters()).values()), g[i::b])
            for (attr, r), o in zip(rows.items(), own, strict=True):
                torch.testing.assert_close(r[i], o, rtol=1e-5, atol=1e-5, msg=f"patient {i}: {attr}, rows {shape}")


@pytest.mark.parametrize("layer", [nn.Conv1d(6, 4, 5, stride=2, padding=2), nn.Conv1d(6, 4, 3, padding=1, dilation=2, groups=2, padding_mode="reflect")], ids=repr)
def test_a_conv_run_once_per_patient_gives_the_same_as_one_grouped_call(layer: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.patient_layers as patient_layers
    from client.patient_layers import Conv1d, patient_forward

    torch.manual_seed(3)
    b, k = 3, 4
    x = torch.randn(k * b, 6, 11)
    with torch.no_grad():
        copies = {a: Conv1d.copies(a, [p + 0.1 * i * torch.randn_like(p) for i in range(b)]).requires_grad_() for a, p in layer.named_parameters()}  # distinct per patient
    outputs, grads = [], []
    for limit in (patient_layers.ONE_CALL_WEIGHT_AT_MOST, 0):
        monkeypatch.setattr(patient_layers, "ONE_CALL_WEIGHT_AT_MOST", limit)
        out = patient_forward(layer, x, copies, b, k * b)
        outputs.append(out)
        grads.append(torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), list(copies.values())))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for one, loop in zip(*grads, strict=True):
        torch.testing.assert_close(one, loop, rtol=1e-5, atol=1e-5)


class Positional(nn.Module):
    """Adds positions made by a trainable Linear from a (F, 1) tensor shared by every row: not the batch's session rows."""

    def __init__(self) -> None:
        super().__init__()
        self.pos, self.out = nn.Linear(1, N_MELS), nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        positions = self.pos(torch.linspace(0, 1, mel.shape[-1]).unsqueeze(-1)).t()  # (n_mels, F)
        return self.out((mel + positions).mean(-1)).squeeze(-1)


class TimeMajor(nn.Module):
    """A Linear over time-major activations (F, N, n_mels): its first dimension is frames, not rows."""

    def __init__(self) -> None:
        super().__init__()
        self.frame, self.out = nn.Linear(N_MELS, 2), nn.Linear(2, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.out(self.frame(mel.permute(2, 0, 1)).mean(0)).squeeze(-1)  # (F, N, 2) -> (N, 2) -> (N,)


class Reversed(nn.Module):
    """Calls its Linear on the rows in reverse order (and turns them back): the right shape, the wrong patients."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.a(mel.mean(-1).flip(0)).flip(0).squeeze(-1)


class ReversedWhenTraining(Reversed):
    """Reverses its rows only in training mode: the probe must run that path."""

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = mel.mean(-1)
        return (self.a(h.flip(0)).flip(0) if self.training else self.a(h)).squeeze(-1)


@pytest.mark.parametrize("frames", [F, B * K])  # B·K frames: the first dimension equals the batch's rows by coincidence
@pytest.mark.parametrize("model", [Positional, TimeMajor, Reversed, ReversedWhenTraining])
def test_a_layer_called_on_other_than_the_batch_rows_in_order_is_refused(model: type[nn.Module], frames: int) -> None:
    """Each of these would give a patient's rows to another patient's copies; the first step's probe refuses them whatever the batch size."""
    mel, markers, y, m = batch(N_MODEL_MARKERS)
    mel = mel[..., :1].expand(-1, -1, -1, frames) + torch.randn(B, K, N_MELS, frames)  # (B, K, n_mels, frames)
    grouped = GroupedGrads(model())
    for _ in range(2):  # and refused again at the next step
        with pytest.raises(UnsupportedLayerError, match=r"called on a tensor of shape|does not give each patient's rows their own parameter copies"):
            grouped(mel, markers, y, m)
    assert not grouped.rows_checked


class Tied(nn.Module):
    """Two Linear modules sharing one weight, keyword-called, and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(N_MELS, N_MELS), nn.Linear(N_MELS, N_MELS, bias=False)
        self.b.weight = self.a.weight
        self.norm = nn.LayerNorm(N_MELS)
        self.out = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(input=mel.mean(-1)))  # (N, n_mels)
        return self.out(self.norm(self.b(h))).squeeze(-1) + markers[:, 0]


def test_grouped_equals_functorch_with_a_weight_tied_across_modules_a_keyword_call_and_layer_norm() -> None:
    torch.manual_seed(5)
    assert_same_as_functorch(Tied(), batch(N_MODEL_MARKERS, seed=6))


class SqueezedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.a(mel.mean(-1)).squeeze()  # (N,), and a 0-d tensor for one row (as the probe runs it)


def test_the_probe_handles_a_model_whose_one_row_output_is_a_scalar() -> None:
    torch.manual_seed(6)
    assert_same_as_functorch(SqueezedOut(), batch(N_MODEL_MARKERS))


class WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.weight_norm(nn.Linear(N_MELS, 1))

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.a(mel.mean(-1)).squeeze(-1)


class SharedAcrossKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(N_MELS, N_MELS), nn.Linear(N_MELS, 1)
        self.norm = nn.GroupNorm(1, N_MELS)
        self.norm.bias = self.a.bias  # one parameter: a Linear's bias and a GroupNorm's bias, copied in different shapes

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(mel.mean(-1)))).squeeze(-1)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # the old-style reparametrisation is what is refused
def test_grouped_refuses_reparametrised_shared_across_kinds_and_instance_forward_layers_by_name() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"layer 'a' \(Linear\) to hold its parameters as `weight` and `bias` \(it holds bias, weight_g, weight_v"):
        GroupedGrads(WeightNormed())
    with pytest.raises(UnsupportedLayerError, match=r"A parameter of layer 'norm' is shared with a layer of another kind"):
        GroupedGrads(SharedAcrossKinds())
    model = nn.Sequential(nn.Linear(N_MELS, 1))
    model[0].forward = lambda x: x.sum(-1, keepdim=True)  # an instance forward the per-patient form would bypass
    with pytest.raises(UnsupportedLayerError, match=r"Layer '0' \(Linear\) has its own `forward` set on the instance"):
        GroupedGrads(model)
    for refused in (WeightNormed, SharedAcrossKinds):
        with pytest.warns(RuntimeWarning, match="Falling back to the functorch"):
            make_patient_grads(refused(), strategy="grouped").close()


def test_every_layer_gets_its_own_forward_back_even_when_the_pass_fails() -> None:
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    grouped = GroupedGrads(model)
    grouped(*batch(N_MODEL_MARKERS))
    assert not any("forward" in vars(module) for module in model.modules())
    mel, markers, y, m = batch(N_MODEL_MARKERS)
    with pytest.raises(RuntimeError):
        grouped(mel[:, :, :3], markers, y, m)  # 3 mel bands for a conv that takes 8: it fails inside the pass
    assert not any("forward" in vars(module) for module in model.modules())
    grouped.close()
    model(session_rows(mel), session_rows(markers))  # the model runs as before


def test_grouped_handles_dropout_with_the_forward_pass_own_masks() -> None:
    """functorch's vmap refuses random ops; grouped's rows come from one ordinary pass, so with the
    same dropout draws their sum over patients is the ordinary gradient of the summed losses."""
    from client.patient_grads import patient_losses, session_rows

    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2, dropout=0.5), n_mels=N_MELS, n_markers=N_MODEL_MARKERS).train()
    mel, markers, y, m = batch(N_MODEL_MARKERS)
    torch.manual_seed(7)
    grads, losses = per_patient(model, "grouped", (mel, markers, y, m))
    torch.manual_seed(7)
    ordinary = patient_losses(model(session_rows(mel), session_rows(markers)).view(K, B).t(), y, m)  # the same rows, the same dropout draws
    ordinary.sum().backward()
    torch.testing.assert_close(losses, ordinary.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].sum(0), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(8)
    assert not torch.equal(per_patient(model, "grouped", (mel, markers, y, m))[1], losses)  # dropout really drew


class CentresTheBatch(nn.Module):
    """No parameter of its own mixes rows, but the forward subtracts the batch mean: patients leak into each other's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = mel.mean(-1)  # (N, n_mels)
        return self.a(h - h.mean(0, keepdim=True)).squeeze(-1)


def test_grouped_refuses_a_model_that_mixes_sessions_across_the_batch() -> None:
    with pytest.raises(UnsupportedLayerError, match="CentresTheBatch mixes sessions within a batch"):
        per_patient(CentresTheBatch(), "grouped", batch(N_MODEL_MARKERS))
    # a dropout model passes the probe (same draws for both probes) and is checked only once
    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2, dropout=0.5), n_mels=N_MELS, n_markers=N_MODEL_MARKERS).train()
    grouped = GroupedGrads(model)
    grouped(*batch(N_MODEL_MARKERS))
    assert grouped.rows_checked
    grouped.close()


class CentresTheBatchWhenAsked(nn.Module):
    """Mixes sessions only with its flag on; the flag is a plain attribute its repr does not show."""

    def __init__(self, *, centre: bool) -> None:
        super().__init__()
        self.a = nn.Linear(N_MELS, 1)
        self.centre = centre

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = mel.mean(-1)  # (N, n_mels)
        return self.a(h - h.mean(0, keepdim=True) if self.centre else h).squeeze(-1)


def test_the_probe_runs_once_per_architecture_and_a_mixing_model_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site's later rounds (a new GroupedGrads on a model of the same architecture) skip the probe; any other architecture is probed."""
    probes = []
    original = GroupedGrads.check_sessions_independent

    def spy(self: GroupedGrads, *args: torch.Tensor) -> bool:
        probes.append(type(self.model).__name__)
        return original(self, *args)

    monkeypatch.setattr(GroupedGrads, "check_sessions_independent", spy)
    spec = ModelSpec(hidden=8, conv_channels=4, groups=2)
    for _ in range(3):  # three rounds, a fresh model each
        per_patient(ProsodyMelNet(spec, n_mels=N_MELS, n_markers=N_MODEL_MARKERS), "grouped", batch(N_MODEL_MARKERS))
    assert probes == ["ProsodyMelNet"]
    per_patient(ProsodyMelNet(ModelSpec(hidden=8, conv_channels=6, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS), "grouped", batch(N_MODEL_MARKERS))
    assert probes == ["ProsodyMelNet", "ProsodyMelNet"]  # other layer sizes: another architecture, probed
    for _ in range(2):  # a refused architecture is never remembered
        with pytest.raises(UnsupportedLayerError, match="CentresTheBatch mixes sessions within a batch"):
            per_patient(CentresTheBatch(), "grouped", batch(N_MODEL_MARKERS))
    assert probes[2:] == ["CentresTheBatch", "CentresTheBatch"]
    # Same class, same repr, a different flag: another architecture, probed and refused.
    per_patient(CentresTheBatchWhenAsked(centre=False), "grouped", batch(N_MODEL_MARKERS))
    assert repr(CentresTheBatchWhenAsked(centre=False)) == repr(CentresTheBatchWhenAsked(centre=True))
    with pytest.raises(UnsupportedLayerError, match="CentresTheBatchWhenAsked mixes sessions within a batch"):
        per_patient(CentresTheBatchWhenAsked(centre=True), "grouped", batch(N_MODEL_MARKERS))


class Conv2dWithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(2, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.conv(mel.unsqueeze(1)).mean((-2, -1)))).squeeze(-1)


def test_the_functorch_fallback_handles_a_model_with_dropout() -> None:
    torch.manual_seed(0)
    model = Conv2dWithDropout().train()
    with pytest.warns(RuntimeWarning, match="Falling back to the functorch"):
        grads = make_patient_grads(model, strategy="grouped")
    b, k = 3, 2
    mel, markers = torch.randn(b, k, N_MELS, 20), torch.randn(b, k, N_MODEL_MARKERS)
    y, m = torch.randint(0, 2, (b, k)).float(), torch.ones(b, k)
    rows, losses = grads(mel, markers, y, m)  # vmap refuses random ops unless told how to draw them
    assert rows["conv.weight"].shape == (b, *model.conv.weight.shape) and losses.shape == (b,)
    assert torch.isfinite(rows["conv.weight"]).all()
    grads.close()


def test_session_rows_are_session_major_and_free_for_a_batch_laid_out_by_dp_train() -> None:
    from client.dataset import PatientTensors
    from client.dp_train import _batch
    from client.patient_grads import session_rows

    p, k = 6, 4
    data = PatientTensors(torch.randn(p, k, N_MELS, F).half(), torch.randn(p, k, N_MODEL_MARKERS), torch.ones(p, k), torch.ones(p, k, dtype=torch.bool), tuple(map(str, range(p))))
    idx = torch.tensor([4, 1, 3])
    mel, markers, y, _ = _batch(data, idx, k, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert mel.shape == (3, k, N_MELS, F) and mel.dtype == torch.float32 and markers.shape == (3, k, N_MODEL_MARKERS)
    assert torch.equal(mel, data.mel[idx].float()) and torch.equal(markers, data.markers[idx]) and torch.equal(y, data.labels[idx])
    rows = session_rows(mel)  # (K·B, n_mels, F)
    assert rows.data_ptr() == mel.data_ptr() and rows.is_contiguous()  # a view, no copy
    assert torch.equal(rows[2 * 3 + 1], mel[1, 2])  # row k·B + b is patient b's session k
    assert torch.equal(session_rows(markers), markers.transpose(0, 1).flatten(0, 1))


def test_wide_conv_layers_run_one_convolution_per_patient_and_give_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ONE_CALL_WEIGHT_AT_MOST weight values a Conv1d runs once per patient instead of once with the patients as groups; the rows are the same."""
    from torch.profiler import ProfilerActivity, profile

    import client.patient_layers as patient_layers

    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    for limit, convolutions in ((patient_layers.ONE_CALL_WEIGHT_AT_MOST, 2), (0, 2 * B)):
        monkeypatch.setattr(patient_layers, "ONE_CALL_WEIGHT_AT_MOST", limit)
        grouped = GroupedGrads(model)
        grouped.rows_checked = True  # no probe: count this pass's convolutions only
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            grouped(*batch(N_MODEL_MARKERS))
        grouped.close()
        assert {e.key: e.count for e in prof.key_averages()}.get("aten::convolution") == convolutions
        assert_same_as_functorch(model, batch(N_MODEL_MARKERS))


def test_grouped_under_bf16_autocast_gives_float32_rows_as_close_as_functorch() -> None:
    """Mixed precision (as `bench gpu` runs it): rows come back float32, and bf16 costs grouped no more accuracy than functorch."""
    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=8, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    inputs = batch(N_MODEL_MARKERS)
    exact, _ = per_patient(model, "grouped", inputs)
    errors = {}
    patient_grads._INDEPENDENT_ROWS.clear()  # probe under autocast too: the probes compare in full float32 whatever the caller's autocast
    for strategy in ("grouped", "functorch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows, _ = per_patient(model, strategy, inputs)
        assert all(r.dtype == torch.float32 for r in rows.values())
        errors[strategy] = float(torch.cat([(rows[n] - exact[n]).flatten() for n in exact]).norm() / torch.cat([e.flatten() for e in exact.values()]).norm())
    assert 0 < errors["grouped"] <= 1.5 * errors["functorch"] + 1e-3, errors


def test_convs_and_group_norms_run_one_kernel_call_each_way_as_the_plain_pass_does() -> None:
    """The default model's `grouped` pass runs one convolution and one convolution backward per Conv1d (the
    latter giving the input gradient and every patient's weight gradient) and one group norm and one group-norm
    backward per GroupNorm, as the plain pass does, and the rows still equal functorch's."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    inputs = batch(N_MODEL_MARKERS)
    grouped = GroupedGrads(model)
    try:
        grouped(*inputs)  # the first call also probes session independence
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            grouped(*inputs)
    finally:
        grouped.close()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::convolution_backward") == 2 and counts.get("aten::convolution") == 2
    assert counts.get("aten::native_group_norm_backward") == 2 and "aten::native_batch_norm_backward" not in counts  # GroupNorm likewise: one call each
    assert_same_as_functorch(model, inputs)


class ConvInputChanged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.conv, self.out = nn.Conv1d(N_MELS, 4, 3), nn.Conv1d(4, 2, 3), nn.Linear(2, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = self.a(mel)
        out = self.out(self.conv(h).mean(-1))
        h.mul_(2)  # after conv read it
        return out.squeeze(-1)


def test_grouped_refuses_a_conv_input_changed_in_place_by_name() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"input of layer 'conv' was changed in place"):
        per_patient(ConvInputChanged(), "grouped", batch(N_MODEL_MARKERS))


class InPlaceAfterConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(N_MELS, 4, 3, stride=2), nn.ReLU(inplace=True), nn.Conv1d(4, 3, 3), nn.ReLU(inplace=True))
        self.out = nn.Linear(3, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(mel).mean(-1)).squeeze(-1) + markers[:, 0]


def test_grouped_allows_in_place_ops_on_conv_outputs() -> None:
    torch.manual_seed(4)
    assert_same_as_functorch(InPlaceAfterConv(), batch(N_MODEL_MARKERS, seed=5))
