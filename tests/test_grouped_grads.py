"""The `grouped` per-patient gradients: one ordinary forward/backward, exact per-patient rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.layer_grads import UnsupportedLayerError
from client.patient_grads import GroupedGrads, make_patient_grads
from shared.config import ModelSpec
from shared.markers import N_MODEL_MARKERS
from shared.models.prosody_mel import ProsodyMelNet

B, K, N_MELS, F, SPEECH = 5, 3, 8, 20, 6


@pytest.fixture(autouse=True)
def fresh_probe_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's models are probed as a site's first round would probe them (no architecture remembered from another test)."""
    from client import patient_grads

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
    assert all(p.grad is None for p in model.parameters())  # only output gradients were formed
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
    (lambda: nn.Sequential(nn.Conv1d(N_MELS, 2, 3, padding="same")), r"numeric zero padding in layer '0' \(Conv1d\)"),
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
    with pytest.raises(UnsupportedLayerError, match=r"'a' took no part in the forward pass"):
        per_patient(Bypass(), "grouped", batch(N_MODEL_MARKERS))


def test_group_norm_rule_gives_the_same_with_forward_statistics_or_recomputed() -> None:
    from client.layer_grads import group_norm_grads, group_norm_stats

    torch.manual_seed(2)
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(B * K, 4, 7) * 3 + 1  # (N, C, L), off-centre rows
    out = norm(x)
    g = torch.randn_like(out)
    stats = group_norm_stats(norm, out)
    assert stats is not None and stats[0].shape == (B * K, 2)
    with_stats, recomputed = group_norm_grads(norm, x, g, B, stats), group_norm_grads(norm, x, g, B)
    reference = torch.autograd.grad(out, [norm.weight, norm.bias], g)  # the batch sums
    for attr, ref in zip(("weight", "bias"), reference, strict=True):
        torch.testing.assert_close(with_stats[attr], recomputed[attr])
        torch.testing.assert_close(with_stats[attr].sum(0), ref)


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

    def spy(self: GroupedGrads, *args: torch.Tensor) -> None:
        probes.append(type(self.model).__name__)
        original(self, *args)

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


class SamePaddingWithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, 2, 3, padding="same")
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(2, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.conv(mel).mean(-1))).squeeze(-1)


def test_the_functorch_fallback_handles_a_model_with_dropout() -> None:
    torch.manual_seed(0)
    model = SamePaddingWithDropout().train()
    with pytest.warns(RuntimeWarning, match="Falling back to the functorch"):
        grads = make_patient_grads(model, strategy="grouped")
    b, k = 3, 2
    mel, markers = torch.randn(b, k, N_MELS, 20), torch.randn(b, k, N_MODEL_MARKERS)
    y, m = torch.randint(0, 2, (b, k)).float(), torch.ones(b, k)
    rows, losses = grads(mel, markers, y, m)  # vmap refuses random ops unless told how to draw them
    assert rows["conv.weight"].shape == (b, *model.conv.weight.shape) and losses.shape == (b,)
    assert torch.isfinite(rows["conv.weight"]).all()
    grads.close()


@pytest.mark.parametrize(("groups", "stride", "dilation", "padding"), [(1, 2, 1, 2), (2, 1, 2, 3), (4, 3, 1, 0)])
def test_one_call_conv_weight_gradients_equal_one_call_per_patient(groups: int, stride: int, dilation: int, padding: int) -> None:
    from client.layer_grads import conv1d_grads

    torch.manual_seed(1)
    b, k = 3, 4
    layer = nn.Conv1d(8, 4, 5, stride=stride, dilation=dilation, padding=padding, groups=groups)
    x = torch.randn(k * b, 8, 37)  # (N, C, L), session-major rows: patient i's are x[i::b]
    g = torch.randn_like(layer(x))  # (N, O, L_out)
    g[(k - 1) * b + 1] = 0  # a padded (last) session of patient 1
    per, one = (conv1d_grads(layer, x, g, b, one_call=s) for s in (False, True))
    torch.testing.assert_close(one["weight"], per["weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one["bias"], torch.stack([g[i::b].sum((0, 2)) for i in range(b)]))
    for i in range(b):  # and both are patient i's ordinary gradient
        torch.testing.assert_close(per["weight"][i], torch.nn.grad.conv1d_weight(x[i::b], layer.weight.shape, g[i::b], stride=stride, padding=padding, dilation=dilation, groups=groups), rtol=1e-5, atol=1e-5)


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


def test_wide_conv_layers_use_one_call_per_patient_and_give_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ONE_CALL_WEIGHT_AT_MOST weight values the rule loops over patients; the result is the same."""
    import client.layer_grads as layer_grads

    calls: list[int] = []
    real = layer_grads._session_major_conv1d_weight
    monkeypatch.setattr(layer_grads, "_session_major_conv1d_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    assert_same_as_functorch(model, batch(N_MODEL_MARKERS))
    assert len(calls) == 2  # both convs, one call each
    monkeypatch.setattr(layer_grads, "ONE_CALL_WEIGHT_AT_MOST", 0)
    assert_same_as_functorch(model, batch(N_MODEL_MARKERS))
    assert len(calls) == 2  # ...and none more: one call per patient instead


def test_grouped_under_bf16_autocast_gives_float32_rows_as_close_as_functorch() -> None:
    """Mixed precision (as `bench gpu` runs it): rows come back float32, and bf16 costs grouped no more accuracy than functorch."""
    torch.manual_seed(0)
    model = ProsodyMelNet(ModelSpec(hidden=8, conv_channels=8, groups=2), n_mels=N_MELS, n_markers=N_MODEL_MARKERS)
    inputs = batch(N_MODEL_MARKERS)
    exact, _ = per_patient(model, "grouped", inputs)
    errors = {}
    for strategy in ("grouped", "functorch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows, _ = per_patient(model, strategy, inputs)
        assert all(r.dtype == torch.float32 for r in rows.values())
        errors[strategy] = float(torch.cat([(rows[n] - exact[n]).flatten() for n in exact]).norm() / torch.cat([e.flatten() for e in exact.values()]).norm())
    assert 0 < errors["grouped"] <= 1.5 * errors["functorch"] + 1e-3, errors


def test_convs_and_group_norms_form_their_rows_in_the_backward_pass_with_one_kernel_call_each() -> None:
    """The default model's backward for `grouped` runs one weight-gradient convolution per Conv1d and one
    group-norm backward per GroupNorm (each also giving the input gradient), as the plain backward does, and the
    rows still equal functorch's."""
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
