"""The site's report inside a SecAgg+ reply (Flower's legacy ``fitres.metrics`` record).

In a SecAgg+ round the secaggplus mod turns the ClientApp's ``fitres`` reply into a masked
vector; only ``fitres.metrics`` (a ConfigRecord) and ``fitres.num_examples`` reach the
coordinator as sent. The site's name, refusal, ledger head and aggregate metrics ride in
``fitres.metrics``: the same information a plain round's ``site`` and ``metrics`` records
carry, never more. In a with-next-round run the site's evaluation of the model it received
(the plain reply's ``evaluation`` record: k-suppressed aggregates) rides there too, as
``eval.<key>`` numbers.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from shared import protocol as P  # noqa: N812

_SITE_KEYS = (P.SITE_NAME, P.REFUSAL_CODE, P.REFUSAL_REASON, P.LEDGER_HEAD, P.EVAL_REFUSAL_CODE, P.EVAL_REFUSAL_REASON)


def encode(
    *, site_name: str, metrics: dict[str, float] | None, refusal_code: str = "", refusal_reason: str = "", ledger_head: str = "",
    evaluation: dict[str, float] | None = None, eval_refusal_code: str = "", eval_refusal_reason: str = "",
) -> ConfigRecord:
    """``fitres.metrics`` content: site keys as text, aggregate metrics as ``metric.<key>`` floats,
    the evaluation of the received model (when asked) as ``eval.<key>`` floats."""
    out = ConfigRecord({P.SITE_NAME: site_name})
    if refusal_code:
        out[P.REFUSAL_CODE] = refusal_code
        out[P.REFUSAL_REASON] = refusal_reason
    if ledger_head:
        out[P.LEDGER_HEAD] = ledger_head
    if eval_refusal_code:
        out[P.EVAL_REFUSAL_CODE] = eval_refusal_code
        out[P.EVAL_REFUSAL_REASON] = eval_refusal_reason
    for key, value in (metrics or {}).items():
        out[P.METRIC_PREFIX + key] = float(value)
    for key, value in (evaluation or {}).items():
        out[P.EVAL_PREFIX + key] = float(value)
    return out


def problem(record: ConfigRecord) -> str | None:
    """Why a ``fitres.metrics`` record is malformed (the structural checks a plain reply's
    ``site``, ``metrics`` and ``evaluation`` records get), or None: site keys hold text,
    ``metric.``/``eval.`` keys one number each (not a bool, not NaN), and nothing else."""
    for key, value in record.items():
        if key in _SITE_KEYS:
            if not isinstance(value, str):
                return f"{key!r} is a {type(value).__name__}, expected text"
        elif key.startswith((P.METRIC_PREFIX, P.EVAL_PREFIX)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"{key!r} is a {type(value).__name__}, expected one number"
            if value != value:
                return f"{key!r} is NaN"
        else:
            return f"unexpected key {key!r} in {P.LEGACY_FITRES_METRICS!r}"
    return None


def decode(record: ConfigRecord) -> tuple[dict[str, str], dict[str, float]]:
    """(site keys, metrics) from a ``fitres.metrics`` record; unknown keys are dropped."""
    site = {k: str(record[k]) for k in _SITE_KEYS if k in record}
    return site, _numbers(record, P.METRIC_PREFIX)


def decode_evaluation(record: ConfigRecord) -> dict[str, float] | None:
    """The evaluation a ``fitres.metrics`` record carries (``eval.<key>`` numbers), None if none."""
    found = _numbers(record, P.EVAL_PREFIX)
    return found or None


def _numbers(record: ConfigRecord, prefix: str) -> dict[str, float]:
    """The numbers under ``prefix`` (prefix removed); other values are dropped."""
    return {k[len(prefix):]: float(v) for k, v in record.items() if k.startswith(prefix) and isinstance(v, (int, float))}
