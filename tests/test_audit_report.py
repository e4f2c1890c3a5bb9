"""`fedrelapse audit report`: one self-contained HTML file (and a PDF) for the DPO, from a real site ledger."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.budget import budget_status, change_caps
from client.site import Site, TrainResult, site_key_paths
from server.cli import app
from shared.config import SitePolicy, load_site
from shared.models import build_model
from shared.params import get_arrays
from shared.privacy import ledger
from shared.privacy.report import PROBLEMS, UNSIGNED, VERIFIED, ReportData, build_report, fmt_eps, render_html, render_pdf
from tests.conftest import tiny_experiment

runner = CliRunner()
NOTE = "DPO Kari N.: lowered after the 2025 review <b>not bold</b>"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}


def arrays() -> dict[str, np.ndarray]:
    return dict(get_arrays(build_model(tiny_experiment())))


@pytest.fixture(scope="module")
def trained(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """A real site ledger: one run of 2 DP-SGD rounds, then a signed cap change by the DPO."""
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    site = Site(replace(cfg, state_dir=tmp_path_factory.mktemp("report") / "state", policy=SitePolicy()), tiny_experiment())
    for r in (1, 2):
        assert isinstance(site.train(arrays(), run_id="run-a", server_round=r, total_rounds=2), TrainResult)
    change_caps(site.cfg, cap_total=25.0, cap_run=None, note=NOTE)
    return site


@pytest.fixture(scope="module")
def public_key(trained: Site) -> Path:
    return site_key_paths(trained.cfg.state_dir)[1]


@pytest.fixture(scope="module")
def report(trained: Site, public_key: Path) -> ReportData:
    return build_report([trained.ledger_path], public_key=public_key, policy=trained.cfg.policy, title="Privacy audit: site alpha")


@pytest.fixture
def site_yaml(tmp_path: Path) -> Path:
    """A site.yaml for --site; only its policy is read."""
    path = tmp_path / "site.yaml"
    path.write_text("name: alpha\nmanifest: manifest.csv\npolicy:\n  epsilon_cap_total: 30.0\n  epsilon_cap_run: 10.0\n")
    return path


class Collect(HTMLParser):
    """Every URL in src/href, the text, and whether non-void tags open and close in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "action", "srcset", "data")]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_html(text: str) -> Collect:
    parser = Collect()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def test_report_data_matches_the_ledger_and_the_budget(report: ReportData, trained: Site) -> None:
    entries = ledger.read_entries(trained.ledger_path)
    (led,) = report.ledgers
    assert report.ok and led.status == VERIFIED and not led.issues and led.signatures_checked
    assert [r.run_id for r in led.runs] == ["run-a"] and [r.round for r in led.runs[0].rounds] == [1, 2]
    assert led.epsilon_spent == entries[1].epsilon_total and led.runs[0].epsilon == entries[1].epsilon_run
    assert led.runs[0].independent_pld <= led.runs[0].epsilon * 1.001
    assert [(c.cap_total, c.cap_run, c.note) for c in led.cap_changes] == [(25.0, None, NOTE)]
    assert (led.cap_total, led.cap_run) == (25.0, trained.cfg.policy.epsilon_cap_run)
    status = budget_status(trained.cfg)
    assert led.epsilon_remaining == pytest.approx(status["epsilon_remaining"], rel=1e-3)
    assert led.head_hash == entries[-1].hash and led.entries == 3


def test_html_report_is_one_self_contained_file_a_dpo_can_read(report: ReportData, trained: Site) -> None:
    text = render_html(report)
    parsed = parse_html(text)
    images = [v for tag, k, v in parsed.urls if tag == "img" and k == "src"]
    assert len(images) >= 2 and all(v.startswith("data:image/png;base64,") for v in images)
    assert all(base64.b64decode(v.split(",", 1)[1]).startswith(b"\x89PNG") for v in images)
    assert not [v for _, _, v in parsed.urls if v.strip().lower().startswith(("http:", "https:", "//"))]
    assert "<script" not in text.lower() and "<link" not in text.lower()
    words = " ".join(parsed.text)
    assert "verified" in words.lower() and "Everything verified" in words
    assert "run-a" in words
    entries = ledger.read_entries(trained.ledger_path)
    for e in entries[:2]:
        assert fmt_eps(e.epsilon_run) in words and fmt_eps(e.epsilon_total) in words
        assert f"{e.noise_multiplier:.4f}" in words and e.plan_hash in words
    assert "What the numbers mean, in plain language" in words
    assert "changes the probability of any outcome by at most a factor e^ε, except with probability δ" in words
    assert "does not show" in words and "remains for future runs" in words
    assert NOTE in words and "<b>not bold</b>" not in text  # the DPO's note is shown, and escaped


def test_pdf_report_has_text_pages_and_plots(report: ReportData, tmp_path: Path) -> None:
    pdf = tmp_path / "out" / "report.pdf"
    render_pdf(report, pdf)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 5_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 3  # text pages and the two plots


def test_cli_writes_html_and_pdf_and_exits_zero_when_everything_verifies(trained: Site, public_key: Path, site_yaml: Path, tmp_path: Path) -> None:
    out, pdf = tmp_path / "r" / "report.html", tmp_path / "r" / "report.pdf"
    result = runner.invoke(app, ["audit", "report", str(trained.ledger_path), "--out", str(out), "--pdf", str(pdf),
                                 "--public-key", str(public_key), "--site", str(site_yaml), "--title", "Audit alpha"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and out.is_file() and pdf.read_bytes().startswith(b"%PDF")
    words = " ".join(parse_html(out.read_text()).text)
    assert "Audit alpha" in words and "site.yaml, as changed by the ledger" in words


def test_without_a_public_key_the_report_says_signatures_were_not_checked(trained: Site, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["audit", "report", str(trained.ledger_path), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert UNSIGNED in result.output
    words = " ".join(parse_html(out.read_text()).text)
    assert "signatures were not checked" in words and "no public key given" in words


def test_a_tampered_ledger_gives_a_report_that_shows_the_problem_and_exit_1(trained: Site, public_key: Path, tmp_path: Path) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    body = json.loads(lines[0])
    body["epsilon_total"] = 0.1  # hide spending; the hash is left as it was
    lines[0] = json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"
    tampered = tmp_path / "ledger.jsonl"
    tampered.write_text("".join(lines))
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["audit", "report", str(tampered), "--out", str(out), "--public-key", str(public_key)])
    assert result.exit_code == 1, result.output
    assert "problems found" in result.output and "line 1" in result.output
    text = out.read_text()
    words = " ".join(parse_html(text).text)
    assert PROBLEMS.upper() in words and "Problems found" in words and "Everything verified" not in words
    assert "it was altered" in words and "class=\"status bad\"" in text
    assert text.count("data:image/png;base64,") >= 2  # the report is still complete


def test_html_report_renders_in_a_headless_browser(report: ReportData, tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no headless browser (chromium) on this machine")
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(render_html(report))
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}", "--window-size=1200,4000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000


def test_report_includes_empirical_attack_results(tmp_path: Path) -> None:
    from shared.privacy.report import ReportData, render_html

    attack = {"site": "oslo", "members": 42, "non_members": 18, "steps": 300, "fpr_target": 0.1, "epsilon_lower_bound_max": 2.51,
              "settings": [{"setting": "non-private", "epsilon_accounted": None, "attack_auc": 0.915, "tpr_at_fpr": 0.405, "epsilon_lower_bound": 2.2},
                           {"setting": "dp-eps1", "epsilon_accounted": 0.995, "attack_auc": 0.52, "tpr_at_fpr": 0.143, "epsilon_lower_bound": 0.0}]}
    data = ReportData(title="t", generated="2026-11-25T00:00:00+00:00", public_key=None, key_fingerprint="", policy=None, attacks=[attack])
    page = render_html(data)
    assert "Empirical privacy audit" in page and "0.915" in page and "dp-eps1" in page and "ε ≥ 2.51" in page


HOSTILE = "<script>alert(document.domain)</script><img src=x onerror=alert(1)>"


def _attack(**over: object) -> dict:
    return {"site": "oslo", "members": 42, "non_members": 18, "steps": 300, "fpr_target": 0.1, "epsilon_lower_bound_max": 2.51,
            "settings": [{"setting": "dp-eps1", "epsilon_accounted": 0.995, "attack_auc": 0.52, "tpr_at_fpr": 0.143, "epsilon_lower_bound": 0.0}], **over}


def test_a_hostile_attack_file_puts_no_live_markup_into_the_html() -> None:
    attack = _attack(site=HOSTILE, fpr_target=HOSTILE, members=HOSTILE)
    attack["settings"][0]["setting"] = HOSTILE
    data = ReportData(title="t", generated="2026-11-25T00:00:00+00:00", public_key=None, key_fingerprint="", policy=None, attacks=[attack])
    page = render_html(data)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(document.domain)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("&lt;script&gt;") == 4  # site, members, the table header (fpr_target), the setting
    parse_html(page)


@pytest.mark.parametrize(("content", "field"), [
    ([_attack()], "JSON list"),
    (_attack(settings=[{"setting": "x"}]), "settings[0].attack_auc"),
    (_attack(epsilon_lower_bound_max="lots"), "epsilon_lower_bound_max"),
    (_attack(fpr_target=HOSTILE), "fpr_target"),
    (_attack(settings=[{**_attack()["settings"][0], "tpr_at_fpr": "0.1"}]), "settings[0].tpr_at_fpr"),
])
def test_a_malformed_attack_file_is_a_usage_error_naming_the_file_and_the_field(trained: Site, tmp_path: Path, content: object, field: str) -> None:
    bad = tmp_path / "attack.json"
    bad.write_text(json.dumps(content))
    result = runner.invoke(app, ["audit", "report", str(trained.ledger_path), "--out", str(tmp_path / "r.html"), "--attack", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = re.sub(r"[\s│╭╮╰╯─]+", "", result.output)
    assert re.sub(r"\s+", "", str(bad)) in said and field.replace(" ", "") in said


def test_an_entry_dated_9999_12_31_is_reported_and_left_out_of_the_plot(trained: Site, public_key: Path, tmp_path: Path) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    body = json.loads(lines[-1])
    body["time"] = "9999-12-31T23:59:00+00:00"  # valid ISO 8601; verify reports the altered entry
    lines[-1] = json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"
    far = tmp_path / "ledger.jsonl"
    far.write_text("".join(lines))
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["audit", "report", str(far), "--out", str(out), "--pdf", str(tmp_path / "report.pdf"), "--public-key", str(public_key)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # exit 1 for the problem, no traceback
    assert "problems found" in result.output and out.is_file()
    text = out.read_text()
    assert "9999-12-31" in text and text.count("data:image/png;base64,") >= 2


def test_after_a_garbage_line_the_report_numbers_entries_by_file_line_as_verify_does(trained: Site, public_key: Path, tmp_path: Path) -> None:
    bad = tmp_path / "ledger.jsonl"
    bad.write_text("garbage\n" + trained.ledger_path.read_text())
    (led,) = build_report([bad], public_key=public_key, policy=trained.cfg.policy, title="t").ledgers
    assert [i.line for i in led.issues] == [1]
    assert [r.line for r in led.rounds] == [2, 3] and [c.line for c in led.cap_changes] == [4]
    assert all(r.check is not None and r.check.line == r.line for r in led.rounds)  # the independent RDP / PLD column is filled
    page = render_html(build_report([bad], public_key=public_key, policy=trained.cfg.policy, title="t"))
    mech = page[page.index("Mechanisms, round by round"):page.index("Training plans")]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", mech)[1:]]
    assert [c[0] for c in cells] == ["2", "3"] and all(c[-1] != "-" and " / " in c[-1] for c in cells)


def test_the_report_says_to_compare_the_plan_hash_with_run_json_not_sha256sum(report: ReportData) -> None:
    words = re.sub(r"\s+", " ", "".join(parse_html(render_html(report)).text))
    assert "It is not sha256sum config.yaml: compare it with plan_hash in the run folder's run.json" in words
    assert "it equals sha256sum" not in words


@pytest.mark.parametrize("minutes", [2, 3, 6327, 2_500_000])
def test_the_epsilon_over_time_plot_draws_without_a_date_locator_warning(report: ReportData, minutes: int) -> None:
    import datetime as dt
    import warnings

    from shared.privacy.report import _png, timeline_figure

    (led,) = report.ledgers
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    step = dt.timedelta(minutes=minutes) / max(len(led.rounds) - 1, 1)
    rounds = [replace(r, time=t0 + i * step) for i, r in enumerate(led.rounds)]
    runs = [replace(run, rounds=[x for x in rounds if x.run_id == run.run_id]) for run in led.runs]
    led = replace(led, rounds=rounds, runs=runs, cap_timeline=led.cap_timeline[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _png(timeline_figure(led))
