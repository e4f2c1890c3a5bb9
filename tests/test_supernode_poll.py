"""The SuperNode looks for work every site.yaml idle_poll_s, not Flower's fixed 3 s
(client/supernode_main.py), and only while the installed Flower still has the loop it shortens;
its command line keeps Flower's TLS, node-key and isolation flags. Flower's object pulls that
race a push retry first after 0.05 s, not 1 s (shared/flower_pulls.py)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from typer.testing import CliRunner

from client import supernode_main as sm
from server.cli import app
from server.deployment import supernode_argv
from server.keys import make_ca, make_server, make_site
from shared import flower_pulls
from shared.config import SiteConfig, load_site
from shared.errors import ConfigError
from tests.conftest import dry_run_command

FLOWER_LOOP = '''
import time


def _pull_and_store_message(receive):
    return receive()


def start_client_internal(receive):
    while True:
        run_id = _pull_and_store_message(receive)
        # No message has been pulled therefore we can skip the push stage.
        if run_id is None:
            # If no message was received, wait for a while
            time.sleep(3)
            continue
        return run_id
'''


def fake_flower(tmp_path: Path, source: str) -> ModuleType:
    """A stand-in for flwr.supernode.start_client_internal, loaded from a file (so its source is readable)."""
    path = tmp_path / "fake_start_client_internal.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_start_client_internal", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_idle_poll_starts_at_idle_poll_s_grows_to_flowers_3_s_and_restarts_after_a_message() -> None:
    waited: list[float] = []
    shim = sm.BoundedTime(idle_poll_s=0.25, sleep=waited.append)

    def start_client_internal(looks: int) -> None:  # Flower's idle loop
        for _ in range(looks):
            shim.sleep(3)

    def _push_messages() -> None:  # Flower's wait for the local ClientApp's reply
        shim.sleep(0.5)

    start_client_internal(14)
    idle = list(waited)
    shim.message_pulled()
    waited.clear()
    start_client_internal(2)
    _push_messages()

    assert idle[:3] == [0.25, 0.3125, 0.390625] and idle[-2:] == [3, 3]
    assert all(b == min(3, a * sm.IDLE_GROWTH) for a, b in zip(idle, idle[1:], strict=False))
    assert sum(idle[:12]) < 15  # Flower's rate again after about 13 s of waiting
    assert waited == [0.25, 0.3125, sm.LOCAL_WAIT_S]  # a message restarts the idle wait; local waits stay short
    assert shim.monotonic is time.monotonic and shim.time is time.time  # everything else is the real module


def test_the_installed_flower_is_patched_in_its_supernode_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    flower = importlib.import_module(sm.FLOWER_MODULE)
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.setattr(flower, "time", flower.time)  # restored after the test

    monkeypatch.setattr(flower, sm.PULL_FUNCTION, getattr(flower, sm.PULL_FUNCTION))

    reason = sm.patch(flower, idle_poll_s=0.25)

    assert reason is None, reason
    assert isinstance(flower.time, sm.BoundedTime) and flower.time.idle_poll_s == 0.25
    assert getattr(flower, sm.PULL_FUNCTION).__wrapped__ is not None  # a pulled message restarts the idle wait
    assert superexec.time is time and time.sleep is not flower.time.sleep  # nothing else changed


def test_a_flower_without_the_idle_loop_runs_unchanged_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    changed = fake_flower(tmp_path, FLOWER_LOOP.replace("time.sleep(3)", "time.sleep(backoff())"))
    started: list[list[str]] = []
    monkeypatch.setattr(sys, "argv", sys.argv)

    sm.run([sm.FLAG, "0.25", "--root-certificates", "ca.pem", "--superlink", "coord:9092"], module=changed, entry=lambda: started.append(list(sys.argv)))

    assert changed.time is time  # left as is
    assert started == [["flower-supernode", "--root-certificates", "ca.pem", "--superlink", "coord:9092"]]  # Flower's SuperNode still starts
    err = capsys.readouterr().err
    assert "WARNING: cannot bound the SuperNode idle poll" in err and "no longer has the `if run_id is None: time.sleep(3)` idle loop" in err


def test_a_flower_with_the_idle_loop_is_patched_before_the_supernode_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    flower = fake_flower(tmp_path, FLOWER_LOOP)
    seen: list[object] = []
    monkeypatch.setattr(sys, "argv", sys.argv)

    sm.run([sm.FLAG, "0.5", "--insecure"], module=flower, entry=lambda: seen.append(flower.time))
    shim = flower.time
    shim.next_idle_s = 3.0  # as after a long idle spell
    empty, pulled = flower._pull_and_store_message(lambda: None), shim.next_idle_s
    got, restarted = flower._pull_and_store_message(lambda: 7), shim.next_idle_s

    assert len(seen) == 1 and isinstance(shim, sm.BoundedTime) and shim.idle_poll_s == 0.5
    assert (empty, pulled) == (None, 3.0) and (got, restarted) == (7, 0.5)  # only a pulled message restarts the idle wait
    assert "idle poll every 0.5 s after a message" in capsys.readouterr().err


def test_a_flower_that_pulls_messages_differently_is_left_unchanged(tmp_path: Path) -> None:
    renamed = fake_flower(tmp_path, FLOWER_LOOP.replace("run_id = _pull_and_store_message(receive)", "run_id = receive()"))

    assert sm.patch(renamed, idle_poll_s=0.25) == "fake_start_client_internal.start_client_internal() no longer pulls with _pull_and_store_message()"
    assert renamed.time is time


def test_a_module_without_a_time_name_is_reported_not_patched(tmp_path: Path) -> None:
    no_time = fake_flower(tmp_path, "def start_client_internal():\n    return None\n")

    assert "no `time` module name" in str(sm.patch_reason(no_time))
    assert not hasattr(no_time, "time")


@pytest.mark.parametrize("argv", [["--insecure"], [sm.FLAG, "soon", "--insecure"], [sm.FLAG, "0.001", "--insecure"], [sm.FLAG, "5", "--insecure"],
                                  [sm.FLAG, "0.25", sm.GROWTH_FLAG, "0.5", "--insecure"], [sm.FLAG, "0.25", sm.GROWTH_FLAG, "x", "--insecure"]])
def test_a_missing_or_bad_idle_poll_is_refused_before_flower_starts(tmp_path: Path, argv: list[str]) -> None:
    flower = fake_flower(tmp_path, FLOWER_LOOP)
    started: list[bool] = []

    with pytest.raises(SystemExit) as exc:
        sm.run(argv, module=flower, entry=lambda: started.append(True))

    assert not started and flower.time is time
    assert any(word in str(exc.value) for word in ("usage", "must be numbers", "idle_poll_s", "idle_poll_growth")), exc.value


def test_site_yaml_idle_poll_has_the_launchers_bounds_and_a_bad_value_names_the_field(tmp_path: Path) -> None:
    fields = {f.name: f for f in dataclasses.fields(SiteConfig)}
    site = tmp_path / "site.yaml"
    too_fast, shrinking = tmp_path / "fast.yaml", tmp_path / "shrinking.yaml"
    too_fast.write_text("name: oslo\nmanifest: m.csv\nidle_poll_s: 0.01\n")
    shrinking.write_text("name: oslo\nmanifest: m.csv\nidle_poll_growth: 0.5\n")
    site.write_text("name: oslo\nmanifest: m.csv\n")

    assert (fields["idle_poll_s"].metadata["ge"], fields["idle_poll_s"].metadata["le"]) == sm.IDLE_POLL_RANGE_S
    assert (fields["idle_poll_growth"].metadata["ge"], fields["idle_poll_growth"].metadata["le"]) == sm.GROWTH_RANGE
    assert (load_site(site).idle_poll_s, load_site(site).idle_poll_growth) == (0.25, sm.IDLE_GROWTH)
    with pytest.raises(ConfigError, match="idle_poll_s"):
        load_site(too_fast)
    with pytest.raises(ConfigError, match="idle_poll_growth"):
        load_site(shrinking)


def test_the_bounded_supernode_keeps_flowers_tls_node_key_and_isolation_flags(tmp_path: Path) -> None:
    make_ca(tmp_path)
    priv, _ = make_site(tmp_path, "oslo")
    site = tmp_path / "site.yaml"
    site.write_text("name: oslo\nmanifest: m.csv\n")
    common = {"site_yaml": site, "superlink": "coord:9092", "ca": tmp_path / "ca" / "ca.pem", "port": 9094, "node_key": priv}

    plain = supernode_argv(**common)  # type: ignore[arg-type]
    bounded = supernode_argv(**common, idle_poll_s=0.25)  # type: ignore[arg-type]

    assert Path(plain[0]).name == "flower-supernode"
    assert bounded[:8] == [sys.executable, "-P", "-m", "client.supernode_main", sm.FLAG, "0.25", sm.GROWTH_FLAG, "1.25"]
    assert bounded[8:] == plain[1:]
    idle_poll_s, growth, flower_args = sm.split_argv(bounded[4:])
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parsed = _parse_args_run_supernode().parse_args(flower_args)  # Flower's own parser reads what follows
    assert (idle_poll_s, growth) == (0.25, sm.IDLE_GROWTH) and not parsed.insecure and parsed.isolation == "subprocess"
    assert parsed.root_certificates == str((tmp_path / "ca" / "ca.pem").resolve()) and parsed.auth_supernode_private_key == str(priv.resolve())


def test_site_start_runs_the_bounded_supernode_at_the_site_yaml_rate(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    priv, _ = make_site(tmp_path, "oslo")
    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\nidle_poll_s: 1.5\nidle_poll_growth: 1\n")

    node = CliRunner().invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092", "--ca", str(tmp_path / "ca" / "ca.pem"),
                                    "--node-key", str(priv), "--dry-run"], terminal_width=300)

    assert node.exit_code == 0, node.output
    argv = dry_run_command(node.stdout)
    assert argv[:8] == [sys.executable, "-P", "-m", "client.supernode_main", sm.FLAG, "1.5", sm.GROWTH_FLAG, "1"]
    assert "--auth-supernode-private-key" in argv and "--root-certificates" in argv and "--insecure" not in argv


def recorded_pull(monkeypatch: pytest.MonkeyPatch, *, misses: int, **settings: float) -> tuple[dict[str, bytes], list[float]]:
    """Flower's real pull_objects, shortened with ``settings``, against an object that is missing
    ``misses`` times; returns what it pulled and the waits between tries (recorded, not slept)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    waits: list[float] = []

    class RecordingEvent:  # Flower's retry waits on an Event: record the wait instead of sleeping
        def __init__(self) -> None:
            self.flag = False

        def set(self) -> None:
            self.flag = True

        def is_set(self) -> bool:
            return self.flag

        def wait(self, seconds: float) -> bool:
            waits.append(round(seconds, 6))
            return self.flag

    monkeypatch.setattr(inflatable_utils, "threading", SimpleNamespace(Event=RecordingEvent, Lock=threading.Lock))
    monkeypatch.setattr(inflatable_utils.random, "uniform", lambda a, b: 0.0)  # no jitter
    answers = iter([ObjectUnavailableError("x")] * misses + [b"model"])

    def pull_one(object_id: str) -> bytes:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    module = ModuleType("puller")
    module.pull_objects = inflatable_utils.pull_objects  # type: ignore[attr-defined]
    assert flower_pulls.shorten_first_retry(module, "pull_objects", **settings) is None
    assert flower_pulls.shorten_first_retry(module, "pull_objects", **settings) is None  # twice does not stack
    assert module.pull_objects.fedrelapse_original is inflatable_utils.pull_objects
    return module.pull_objects(["x"], pull_one), waits


def test_a_pull_that_races_a_push_first_retries_after_50_ms_then_doubles_to_flowers_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.constant import PULL_BACKOFF_CAP

    got, waits = recorded_pull(monkeypatch, misses=9)

    assert got == {"x": b"model"}
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, PULL_BACKOFF_CAP]


def test_a_local_pull_retries_every_100_ms_without_running_out_of_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.constant import PULL_MAX_TRIES_PER_OBJECT

    misses = PULL_MAX_TRIES_PER_OBJECT + 100  # Flower's try limit would end this pull with an error
    got, waits = recorded_pull(monkeypatch, misses=misses, backoff_cap_s=flower_pulls.LOCAL_RETRY_CAP_S)

    assert got == {"x": b"model"}
    assert waits[:3] == [0.05, 0.1, 0.1] and max(waits) == flower_pulls.LOCAL_RETRY_CAP_S and len(waits) == misses


def test_the_three_flower_pullers_that_race_a_push_are_recognised() -> None:
    from flwr.superlink.grid import http_grid
    from flwr.supernode.runtime import run_clientapp

    flower = importlib.import_module(sm.FLOWER_MODULE)
    for module, name in ((flower, "pull_objects"), (run_clientapp, "pull_and_inflate_object_from_tree"), (http_grid, "pull_objects")):
        original = getattr(module, name)
        try:
            assert flower_pulls.shorten_first_retry(module, name) is None
            assert getattr(module, name).keywords == {"initial_backoff": flower_pulls.FIRST_RETRY_S}
            assert flower_pulls.shorten_first_retry(module, name, backoff_cap_s=0.1) is None
            assert getattr(module, name).keywords == {"initial_backoff": flower_pulls.FIRST_RETRY_S, "backoff_cap": 0.1, "max_tries_per_object": None}
        finally:
            setattr(module, name, original)


def test_a_puller_without_initial_backoff_is_left_as_is_with_the_reason() -> None:
    module = ModuleType("changed")

    def pull_objects(object_ids: list[str], pull_object_fn: object) -> dict[str, bytes]:
        return {}

    module.pull_objects = pull_objects  # type: ignore[attr-defined]

    assert flower_pulls.shorten_first_retry(module, "pull_objects") == "changed.pull_objects() takes no initial_backoff"
    assert "takes no initial_backoff, backoff_cap, max_tries_per_object" in str(flower_pulls.shorten_first_retry(module, "pull_objects", backoff_cap_s=0.1))
    assert module.pull_objects is pull_objects
    assert "no pull_and_inflate_object_from_tree()" in str(flower_pulls.shorten_first_retry(module, "pull_and_inflate_object_from_tree"))
    with pytest.raises(ValueError, match="positive"):
        flower_pulls.shorten_first_retry(module, "pull_objects", initial_backoff_s=0)
    with pytest.raises(ValueError, match="at least its first"):
        flower_pulls.shorten_first_retry(module, "pull_objects", backoff_cap_s=0.01)


def test_the_clientapp_pulls_its_message_from_its_supernode_every_100_ms_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    from client.pinned_app import prompt_task_pulls

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", run_clientapp.pull_and_inflate_object_from_tree)  # restored after

    prompt_task_pulls(run_clientapp)

    assert run_clientapp.pull_and_inflate_object_from_tree.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": flower_pulls.FIRST_RETRY_S, "backoff_cap": flower_pulls.LOCAL_RETRY_CAP_S, "max_tries_per_object": None}
