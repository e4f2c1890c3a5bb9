"""Names of the records and keys in messages between the ServerApp and ClientApps, and the
rule a run id follows (:func:`run_id_problem`).

What a ClientApp may put in a reply is exactly: the ``arrays`` record (a DP-trained update),
the ``metrics`` record (aggregate metrics, keys in :mod:`shared.metrics`), the ``site``
record (site name, and a refusal code/reason when it refuses) and, in a train reply of a
``federation.evaluation: with-next-round`` run, the ``evaluation`` record: the site's
k-suppressed aggregate metrics of the global model the train message carried, evaluated
before training (asked for by the config key :data:`EVALUATE_FIRST`). Tests inspect
replies against :data:`ALLOWED_REPLY_RECORDS`.

The model on the wire (the global model the coordinator sends in train and evaluate
messages, and a site's update) is ONE float32 ``Array`` named ``model``
(:data:`shared.params.PACKED`) in the ``arrays`` record: every parameter and buffer flattened
in C order and concatenated in the model's ``state_dict`` order. Names and shapes are not
sent; both sides build the layout from the approved plan's model (:func:`shared.models.build_model`).
A receiver first checks that the record holds exactly that one float32 vector and that its
length is the plan model's, then unpacks it to name -> array and runs every usual check
(shapes, NaN/Inf, range, weight, signature). Flower stores each Array and its chunk(s) as
separate objects, moved one request each in deployment: a train message of the default
model is 6 objects (it was 28 with one Array per parameter). SecAgg+ rounds carry the same
one vector as the single entry of ``fitins.parameters``/``fitres.parameters``. Model
signatures are over the unpacked name -> array dict (so they bind names); checkpoints keep
one tensor per name (safetensors).
"""

from __future__ import annotations

import re

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
EVALUATION = "evaluation"  # a train reply's evaluation of the model it received (with-next-round runs)
ALLOWED_REPLY_RECORDS = frozenset({ARRAYS, METRICS, SITE, EVALUATION})

# ConfigRecord keys the server sends.
SERVER_ROUND = "server-round"
TOTAL_ROUNDS = "total-rounds"
RUN_ID = "run-id"  # at most MAX_RUN_ID_CHARS printable characters (run_id_problem); it is written into every ledger entry and log line
PLAN_YAML = "plan-yaml"
MODEL_SIGNATURE = "model-signature"  # Ed25519 over model digest, run id, round and plan hash
EVALUATE_FIRST = "evaluate-first"  # bool in a train message: evaluate the model it carries, then train (with-next-round)

# ConfigRecord keys a site sends back in the SITE record.
SITE_NAME = "name"
REFUSAL_CODE = "refusal-code"
REFUSAL_REASON = "refusal-reason"
LEDGER_HEAD = "ledger-head"  # hash of the newest ledger entry: lets a DPO detect a truncated ledger
EVAL_REFUSAL_CODE = "eval-refusal-code"  # a with-next-round train reply: why it carries no evaluation (the site's refusal to release it)
EVAL_REFUSAL_REASON = "eval-refusal-reason"
ALLOWED_SITE_KEYS = frozenset({SITE_NAME, REFUSAL_CODE, REFUSAL_REASON, LEDGER_HEAD, EVAL_REFUSAL_CODE, EVAL_REFUSAL_REASON})

# Run-config keys (pyproject [tool.flwr.app.config], overridable with --run-config).
RC_EXPERIMENT = "experiment"
RC_OUT = "out"
RC_RUN_ID = "run-id"  # at most MAX_RUN_ID_CHARS printable characters (run_id_problem); it is written into every ledger entry and log line
RC_SIGNING_KEY = "signing-key"  # coordinator's model-signing private key (path on the coordinator)
RC_RESUME = "resume"  # run folder of a deployed run to continue (path on the coordinator); empty: a new run

# Node-config key a SuperNode sets to its site.yaml (deployment).
NC_SITE_CONFIG = "site-config"

# SecAgg+ rounds use Flower's legacy records (the secaggplus mod reads and rewrites them):
# the ServerApp sends ``fitins.parameters`` (one array: the packed global model, see above)
# and ``fitins.config`` (the CONFIG keys above); the site answers with ``fitres.*``. Its
# site record (name, refusal, ledger head) and its aggregate metrics ride in
# ``fitres.metrics``; the arrays are cleared by the mod and replaced by the masked vector.
LEGACY_FITINS_ARRAYS = "fitins.parameters"
LEGACY_FITINS_CONFIG = "fitins.config"
LEGACY_FITRES_METRICS = "fitres.metrics"  # the site's report (shared.secure_records), sent in the clear
METRIC_PREFIX = "metric."  # fitres.metrics key prefix of a shared.metrics value
EVAL_PREFIX = "eval."  # fitres.metrics key prefix of an evaluation value (the EVALUATION record's content)


# --- site names: shown on the researcher's console and keys of the run folder ---

NAME_LIMIT = 64  # characters a site name may have
_SITE_NAME = re.compile(r"\w[\w .,'()&+-]*")  # letters and digits of any script, then also space . , ' ( ) & + -
_RESERVED_NAME = re.compile(r"node-\d+")  # the coordinator's label for a node it has no name for


def name_problem(name: object) -> str | None:
    """Why a claimed site name is not accepted (None if it is): a name is printed and used as a
    key of the run folder, so it is 1-64 letters, digits and ``_ .,'()&+-``, starting with a
    letter, digit or ``_``; ``node-<id>`` is the coordinator's label for unnamed nodes."""
    if not isinstance(name, str) or not name:
        return "it gives no site name"
    if len(name) > NAME_LIMIT:
        return f"its site name has {len(name)} characters; at most {NAME_LIMIT} are accepted"
    if not _SITE_NAME.fullmatch(name) or name != name.strip():
        return f"its site name {name!r} has characters a site name may not have (letters, digits, space and _ .,'()&+- only)"  # repr shows control characters as \x escapes
    if _RESERVED_NAME.fullmatch(name):
        return f"its site name {name!r} is the coordinator's label for a node that gave no name"
    return None


# A run id goes into the site's signed ledger (one entry per round) and its log lines, so a
# site refuses one that is long or could forge a line. The coordinator's own ids are
# "<experiment name>-<UTC time>" (server.app.new_run_id: at most 100 + 17 characters, the
# name's limit in shared.config) or the run config's `run-id`, checked before any site is asked.
MAX_RUN_ID_CHARS = 128


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` may not be used (a phrase that never repeats the id), or None.

    Allowed: 1 to :data:`MAX_RUN_ID_CHARS` printable characters (letters, digits, punctuation
    and symbols of any script, and the ASCII space); no control, format or line-separator
    characters (a newline, an ANSI escape, a right-to-left override).
    """
    if not run_id:
        return "is empty"
    if len(run_id) > MAX_RUN_ID_CHARS:
        return f"is {len(run_id)} characters long; at most {MAX_RUN_ID_CHARS} are allowed"
    bad = next((i for i, ch in enumerate(run_id) if not ch.isprintable()), None)
    if bad is not None:
        return f"holds the non-printable character U+{ord(run_id[bad]):04X} at position {bad + 1}; only printable characters are allowed"
    return None
