"""A real 3-site, 2-round federated DP run in Flower's Simulation Engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.numpy import load_file

from server.simulate import simulate
from shared.models import build_model
from tests.conftest import RecordingGrid, tiny_experiment

WIRE: dict[str, list[Message]] = {"sent": [], "replies": []}


@pytest.fixture(scope="module")
def run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    summary = simulate(tiny_experiment(), tiny_cohort, out, run_id="sim-test", console=Console(quiet=True), cpus=2,
                       wrap_grid=lambda g: cast(Grid, RecordingGrid(g, WIRE["sent"], WIRE["replies"])))  # duck-typed: the wrapped Grid's own methods
    return out, summary


def test_three_sites_two_rounds_complete_with_dp(run: tuple[Path, dict]) -> None:
    out, summary = run
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 2
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"}
    target = tiny_experiment().privacy.target_epsilon
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= target * 1.001
        assert site["delta"] == pytest.approx(1e-5)
        assert site["noise_multiplier"] > 0.3


def test_run_folder_holds_config_metrics_plot_checkpoints_and_summary(run: tuple[Path, dict]) -> None:
    out, summary = run
    for name in ("config.yaml", "metrics.json", "metrics.png", "summary.json"):
        assert (out / name).is_file(), name
    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    eps = [r["sites"]["alpha"]["epsilon-run"] for r in rounds]
    assert eps[0] < eps[1]  # ε grows with rounds
    expected = {k: v.shape for k, v in build_model(tiny_experiment()).state_dict().items()}
    for rnd in (1, 2):
        ckpt = load_file(str(out / "checkpoints" / f"round-{rnd:03d}.safetensors"))
        assert {k: tuple(v.shape) for k, v in ckpt.items()} == {k: tuple(s) for k, s in expected.items()}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["final_federated_auroc"] is None or 0.0 <= summary["final_federated_auroc"] <= 1.0


def test_every_model_message_carries_one_packed_array_of_few_objects(run: tuple[Path, dict]) -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from shared import protocol as P  # noqa: N812
    from shared.params import PACKED

    n_values = sum(int(v.numel()) for v in build_model(tiny_experiment()).state_dict().values())
    by_kind: dict[str, list[Message]] = {}
    for msg in WIRE["sent"]:
        by_kind.setdefault(msg.metadata.message_type, []).append(msg)
    assert len(by_kind["train"]) == 6 and len(by_kind["evaluate"]) == 3  # 3 sites × 2 rounds; with-next-round (the default): the final model's evaluation only
    train_replies = [m for m in WIRE["replies"] if m.metadata.message_type == "train" and not m.has_error()]
    assert len(train_replies) == 6
    for msg in by_kind["train"] + by_kind["evaluate"] + train_replies:
        content = msg.content
        assert list(content.array_records) == [P.ARRAYS] and list(content[P.ARRAYS]) == [PACKED]
        assert content.array_records[P.ARRAYS][PACKED].shape == (n_values,) and content.array_records[P.ARRAYS][PACKED].dtype == "float32"
        records = len(content.keys())  # config (sent); metrics and site (replies)
        assert len(get_all_nested_objects(msg)) == records + 4  # + the Array, its one chunk, the RecordDict, the Message
