"""σ calibrations cached in the site's state folder: reused by a fresh process, never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

import pytest

import client.sigma_cache as sc
from shared.privacy.accounting import SubsampledGaussian, _calibrate, epsilon


class Ask(TypedDict):
    """What calibrated_sigma is asked for, besides the state folder."""

    target_epsilon: float
    target_delta: float
    sample_rate: float
    steps: int
    accountant: str


ASK = Ask(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.2, steps=20, accountant="rdp")


def test_a_fresh_process_reuses_the_stored_sigma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = sc.calibrated_sigma(tmp_path, **ASK)
    assert epsilon([SubsampledGaussian(first, 0.2, 20)], delta=1e-5) <= 3.0
    _calibrate.cache_clear()  # as in a new ClientApp process
    monkeypatch.setattr(sc, "calibrate_noise", lambda **_: pytest.fail("recalibrated although a valid σ was stored"))
    assert sc.calibrated_sigma(tmp_path, **ASK) == first


def test_an_edited_sigma_that_would_overspend_is_discarded(tmp_path: Path) -> None:
    honest = sc.calibrated_sigma(tmp_path, **ASK)
    path = tmp_path / sc.FILE
    stored = json.loads(path.read_text())
    stored = {k: 0.3 for k in stored}  # far too little noise for ε = 3
    path.write_text(json.dumps(stored))
    assert sc.calibrated_sigma(tmp_path, **ASK) == pytest.approx(honest)
    assert json.loads(path.read_text()) != stored  # repaired on disk


def test_a_stored_sigma_with_more_noise_than_the_search_gives_is_recalibrated(tmp_path: Path) -> None:
    """A σ from an older, coarser search (Opacus' flat 0.01 at ε = 0.1: 65 where 60.6 suffices),
    or an edit, would cost utility in every round it is reused; it is replaced by the search's."""
    small: Ask = ASK | {"target_epsilon": 0.1, "sample_rate": 0.25, "steps": 50}
    honest = sc.calibrated_sigma(tmp_path, **small)
    path = tmp_path / sc.FILE
    path.write_text(json.dumps({k: 65.0 for k in json.loads(path.read_text())}))

    assert sc.calibrated_sigma(tmp_path, **small) == pytest.approx(honest)
    assert list(json.loads(path.read_text()).values()) == [pytest.approx(honest)]


def test_a_damaged_cache_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / sc.FILE).write_text("{not json")
    assert sc.calibrated_sigma(tmp_path, **ASK) > 0


def test_the_q_1_warning_names_each_site_and_is_given_for_a_cached_sigma_too(tmp_path: Path) -> None:
    import warnings

    from shared.privacy.accounting import FullSamplingWarning

    full: Ask = {**ASK, "sample_rate": 1.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: each distinct message once per place
        for site in ("bergen", "oslo", "london"):
            sc.calibrated_sigma(tmp_path / site, **full, site=site)
        first = list(caught)
        with warnings.catch_warnings(record=True) as again:  # σ now comes from the disk cache
            warnings.simplefilter("always")
            sc.calibrated_sigma(tmp_path / "oslo", **full, site="oslo")
    named = sorted(str(w.message).split(":")[0] for w in first if issubclass(w.category, FullSamplingWarning))
    assert named == ["Site bergen", "Site london", "Site oslo"]
    assert [str(w.message).split(":")[0] for w in again if issubclass(w.category, FullSamplingWarning)] == ["Site oslo"]
    assert "lower training.batch_patients" in str(again[0].message)


def test_a_sigma_search_at_a_tiny_epsilon_gives_no_largest_alpha_warning() -> None:
    """At ε 0.02 the best Rényi order is the largest one; Opacus' warning about it was printed
    once per site above `fedrelapse plan`'s table (the bound errs on the safe side)."""
    import warnings

    from shared.privacy.accounting import calibrate_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrate_noise(target_epsilon=0.0199, target_delta=1e-5, sample_rate=0.23, steps=7)
        epsilon([SubsampledGaussian(sigma, 0.23, 7)], delta=1e-5)
    assert sigma > 50  # a tiny ε: σ in the tens (91 to 1 % of ε; Opacus' absolute tolerance gave 160)
    assert not [w for w in caught if "largest alpha" in str(w.message)]
