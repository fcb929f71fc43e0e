"""Experiment spec: a TOML file plus `key=value` overrides, validated into one typed config."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.errors import ConfigError
from fedsim.plugins import absolute_file_plugins, absolute_source

DATA_DIR_ENV = "FEDSIM_DATA_DIR"


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentSection(Section):
    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(30, ge=1)


SENSITIVE_KINDS = ("sensitive", "heterogeneity", "synergy")  # partitions over sensitive groups


class PartitionSection(Section):
    """How the training set is split over clients (label, quantity and sensitive-attribute skew)."""

    kind: Literal["iid", "dirichlet", "pathological", "shards", "natural", "sensitive",
                  "heterogeneity", "synergy"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (labels, or groups for 'sensitive')")
    classes_per_client: int = Field(2, ge=1, description="pathological: classes each client holds")
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards per client")
    min_size: int = Field(10, ge=1, description="minimum training examples per client")
    self_balancing: bool = Field(False, description="dirichlet: a client that holds more than an "
                                 "equal share gets no more examples (NIID-Bench's rule)")
    sizes: Literal["equal", "lognormal", "powerlaw", "dirichlet"] = Field(
        "equal", description="quantity skew of client sizes (kinds iid and dirichlet)")
    size_sigma: float = Field(1.0, gt=0, description="sizes = 'lognormal': sigma of log size")
    size_exponent: float = Field(1.5, gt=0, description="sizes = 'powerlaw': Pareto tail exponent")
    size_alpha: float = Field(1.0, gt=0, description="sizes = 'dirichlet': concentration over clients")
    imbalance: float = Field(1.0, ge=1, description="global long tail: largest / smallest class count")
    majority_share: float = Field(0.92, ge=0, le=1, description="heterogeneity: share of group 1 "
                                  "on the first half of the clients (group 0 gets 1 - share)")
    swap_fraction: float = Field(0.01, ge=0, le=1, description="synergy: share of examples crossing halves")

    @model_validator(mode="after")
    def _sizes_need_a_size_free_kind(self) -> PartitionSection:
        if self.sizes != "equal" and self.kind not in ("iid", "dirichlet"):
            raise ValueError(f"sizes = '{self.sizes}' works with kind 'iid' or 'dirichlet', "
                             f"not '{self.kind}' (its sizes follow from the split)")
        return self


class FeatureSection(Section):
    """Feature / domain skew: client k's inputs are transformed as domain k mod `domains`."""

    kind: Literal["none", "rotation", "noise", "invert", "blur", "mixed", "shift"] = "none"
    domains: int = Field(4, ge=1)
    max_rotation: float = Field(90.0, description="degrees, reached by the last domain")
    max_noise: float = Field(0.5, ge=0, description="noise standard deviation of the last domain")
    max_blur: float = Field(2.0, ge=0, description="Gaussian blur sigma (pixels) of the last domain")
    max_shift: float = Field(1.0, ge=0, description="feature shift length of the last domain")


class WarmupSection(Section):
    """`data.embedding = "warmup"`: FedAvg trains `model` for `rounds` rounds on the raw inputs;
    its layers but the last become the frozen encoder of the run's embeddings."""

    model: str = "cnn"
    rounds: int = Field(10, ge=1)


class SyntheticSection(Section):
    """FedProx Synthetic(alpha, beta): natural clients with model and feature heterogeneity."""

    alpha: float = Field(1.0, ge=0)
    beta: float = Field(1.0, ge=0)
    iid: bool = False
    dim: int = Field(60, ge=1)
    num_classes: int = Field(10, ge=2)
    max_client_size: int | None = Field(None, ge=10)
    eval_clients: int = Field(1000, ge=1, description="clients whose test splits form the test set")


class HFSection(Section):
    """Sources read with Hugging Face `datasets` (`hf:`, `imagefolder:`, `csv:`, `parquet:`):
    which splits and columns to use."""

    subset: str | None = Field(None, description="the hub dataset's configuration name")
    split: str = "train"
    test_split: str = Field("test", description="the central test set when the source has it "
                            "(else a data.test_fraction split of `split`)")
    label_column: str = "label"
    image_column: str | None = Field(None, description="default: the first image column (none: a table)")
    client_column: str | None = Field(None, description="each row's natural client, for "
                                      "data.partition.kind = 'natural'")
    feature_columns: list[str] | None = Field(None, description="tables: the feature columns "
                                              "(default: all but label and client)")
    image_size: list[int] | None = Field(None, min_length=2, max_length=2,
                                         description="resize images to [height, width]")
    image_mode: Literal["auto", "L", "RGB"] = Field("auto", description="grey (L) or colour "
                                                    "(RGB); auto: as the first image")


class LabelsSection(Section):
    """Clients with few labels: each keeps only a share of its training labels; the rest of its
    training examples are unlabelled (they reach training code without labels)."""

    fraction: float = Field(1.0, gt=0, le=1, description="labelled share of each client's training data")
    fraction_max: float | None = Field(None, gt=0, le=1, description="draw each client's share "
                                       "uniformly from [fraction, fraction_max] instead")
    stratified: bool = Field(True, description="label the same share of every class a client "
                             "holds (at least one example each); false: a uniform random subset")

    @model_validator(mode="after")
    def _ordered(self) -> LabelsSection:
        if self.fraction_max is not None and self.fraction_max < self.fraction:
            raise ValueError(f"data.labels.fraction_max = {self.fraction_max} is below "
                             f"data.labels.fraction = {self.fraction}: set fraction <= fraction_max")
        return self

    @property
    def partial(self) -> bool:
        """Whether some training labels are hidden."""
        return self.fraction < 1 or (self.fraction_max is not None and self.fraction_max < 1)


class DataSection(Section):
    dataset: str = "digits"
    num_clients: int = Field(20, ge=1)
    root: Path | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1, description="global held-out test share")
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    embedding: str = Field("", description="'' raw inputs; 'identity' flattened inputs; 'warmup' (a "
                           "federated warm-up's feature extractor); or a frozen torch encoder file")
    train_subset: int | None = Field(None, ge=1, description="use about this many training examples "
                                     "(a stratified sample), for quick experiments")
    sensitive: str | None = Field(None, description="sensitive attribute (adult: sex|race; german: sex|age)")
    partition: PartitionSection = Field(default_factory=PartitionSection)
    features: FeatureSection = Field(default_factory=FeatureSection)
    warmup: WarmupSection = Field(default_factory=WarmupSection)
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    hf: HFSection = Field(default_factory=HFSection)
    labels: LabelsSection = Field(default_factory=LabelsSection)
    memory_map: bool = Field(True, description="decode large datasets once into the cache and "
                             "memory-map them, so processes share one copy")
    holdout: float = Field(0.0, ge=0, lt=1, description="share of the training set kept out of "
                           "the federation for central pretraining (`fedsim pretrain`); the same "
                           "rows for every experiment seed where the dataset has its own test split")

    @model_validator(mode="after")
    def _root_from_environment(self) -> DataSection:
        if self.root is None and os.environ.get(DATA_DIR_ENV):
            self.root = Path(os.environ[DATA_DIR_ENV])
        return self

    @model_validator(mode="after")
    def _absolute_source_path(self) -> DataSection:
        """A source given as a relative path means the same in every process."""
        if (absolute := absolute_source(self.dataset, Path.cwd())) != self.dataset:
            self.dataset = absolute
        return self


class ModelSection(Section):
    """A built-in model by name, or a user's model function by import string; a user's model may
    take extra keys of its own (built-in models allow none)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128])
    init: Path | None = Field(None, description="start from these weights: a state dict saved by "
                              "`fedsim pretrain` (.pt) or a .npz of named arrays")


# Local training recipes of papers; a preset fills the client keys the spec leaves unset.
CLIENT_PRESETS: dict[str, dict[str, Any]] = {
    "fedld": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "weight_decay": 5e-4, "batch_size": 50},
}


class ClientSection(Section):
    preset: str | None = Field(None, description=f"a paper's recipe: {', '.join(CLIENT_PRESETS)}")
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="if set, overrides local_epochs")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augment: list[Literal["crop", "flip"]] = Field(
        default_factory=list, description="train-time image augmentation on the worker's device: "
        "'crop' (pad 4, random crop), 'flip' (random horizontal flip)")
    objectives: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra local terms for any strategy, e.g. {parity = {mu = 1.0}}")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not isinstance(values.get("preset"), str):
            return values  # no preset (a preset of the wrong type: the field's own check says so)
        if values["preset"] not in CLIENT_PRESETS:
            raise ValueError(f"unknown preset '{values['preset']}'; known: {', '.join(CLIENT_PRESETS)}")
        return {**CLIENT_PRESETS[values["preset"]], **values}


class SystemSection(Section):
    """System heterogeneity: dropout, stragglers, client speeds and a round deadline (all seeded)."""

    dropout: float = Field(0.0, ge=0, lt=1, description="chance a sampled client drops out of a round")
    stragglers: float = Field(0.0, ge=0, le=1, description="fraction of clients that straggle")
    straggler_work: float = Field(0.5, gt=0, le=1, description="share of local steps stragglers do")
    speed_sigma: float = Field(0.0, ge=0, description="client speed factor ~ LogNormal(0, sigma)")
    step_seconds: float = Field(0.01, gt=0, description="simulated seconds per local step at speed 1")
    deadline: float | None = Field(None, gt=0, description="simulated seconds; slower clients time out")


class GgeurSection(Section):
    """GGEUR: a statistics phase before training and class top-up by geometric sampling on the
    clients, an add-on to any strategy. Works on `data.embedding` features."""

    enabled: bool = False
    target: int | None = Field(None, ge=1, description="examples per class after top-up "
                               "(default: from target_rule)")
    target_rule: Literal["global", "share"] = Field(
        "global", description="default target: the class's global count (as the reference code), "
        "or 'share': the global count / number of clients")
    scaling: Literal["sqrt", "lambda"] = "sqrt"
    min_count: int = Field(1, ge=1, description="a client does not report classes it holds fewer of")
    noise_std: float = Field(0.0, ge=0, description="Gaussian noise on the reported sums")
    prototypes: bool = Field(False, description="share class means and sample around other "
                             "clients' (the multi-domain variant)")
    prototype_draws: Literal["domain", "center"] = Field(
        "domain", description="with prototypes: as many draws around each other client's class "
        "mean as around the client's own examples together (as the reference code), or 'center': "
        "each mean counts as one more example")


class PrivacySection(Section):
    """Client-level differential privacy (DP-FedAvg): every client's update clipped to an L2 norm,
    Gaussian noise on their sum at the server, epsilon at `delta` from an accountant."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / clip norm on the sum of "
                                    "the clipped updates (with adaptive clipping: of the whole "
                                    "mechanism, the clipped-count query included)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of a client's update (adaptive: "
                             "where it starts)")
    adaptive: bool = Field(False, description="adapt the clip norm to a quantile of the update "
                           "norms (Andrew et al., 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: share of updates "
                                   "meant to fall within the clip norm")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: geometric step of the clip norm")
    clipped_count_stddev: float | None = Field(None, gt=0, description="adaptive: noise std of "
                                               "the clipped count (default: cohort size / 20)")
    delta: float | None = Field(None, gt=0, lt=1, description="the epsilon reported is at this "
                                "delta (default: 1 / num_clients^1.1, below 1 / num_clients)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's Renyi (rdp) or "
                                              "privacy-loss-distribution (pld, Poisson only) accountant")
    secure_randomness: bool = Field(False, description="draw the server's noise and the cohorts from "
                                    "the operating system's entropy: the guarantee needs them secret, "
                                    "and seeded ones can be regenerated from config.json (runs are then "
                                    "not reproducible)")


class DpSgdSection(Section):
    """Example-level differential privacy (DP-SGD, Abadi et al., 2016) on every client, through
    Opacus: Poisson-sampled batches, per-example gradients clipped to an L2 norm, Gaussian noise on
    their sum every step; epsilon at `delta` per client from an accountant, the largest reported."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / clip norm on each step's "
                                    "sum of clipped per-example gradients")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of one example's gradient")
    delta: float | None = Field(None, gt=0, lt=1, description="the epsilon reported is at this delta "
                                "(default: 1 / n^1.1 for the largest client's n training examples)")
    secure_randomness: bool = Field(False, description="seed the noise from the operating system's "
                                    "entropy instead of the experiment seed (runs are then not "
                                    "reproducible)")


class StrategySection(BaseModel):
    """Strategy name, cohort size, and the strategy's own parameters (checked by the strategy)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "fedavg"
    clients_per_round: int | None = Field(10, ge=1)
    fraction: float | None = Field(None, gt=0, le=1, description="overrides clients_per_round")
    min_available_clients: int = Field(1, ge=1, description="deployed: stop the run when fewer "
                                       "clients' nodes are online")
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed", description="'fixed': exactly the cohort size, drawn without replacement; "
        "'poisson': each client independently with probability cohort size / num_clients")

    @property
    def params(self) -> dict[str, Any]:
        """The strategy-specific keys (everything but name, cohort size and availability)."""
        return dict(self.model_extra or {})


class AttackSettings(Section):
    """How adversarial examples are made (PGD in an eps-ball; FGSM is its one-step L-inf case)."""

    steps: int = Field(10, ge=1, description="PGD steps")
    step_size: float | None = Field(None, gt=0, description="PGD step (default: 2.5 eps / steps)")
    norm: Literal["linf", "l2"] = "linf"
    input_range: list[float] | None = Field(None, min_length=2, max_length=2, description="clip "
                                            "adversarial inputs into [low, high] (e.g. [0, 1])")

    def step_for(self, eps: float) -> float:
        return self.step_size or 2.5 * eps / self.steps

    @property
    def box(self) -> tuple[float, float] | None:
        return tuple(self.input_range) if self.input_range is not None else None


class RobustSection(AttackSettings):
    """Robust accuracy of the global model on the central test set, at every central evaluation."""

    eps: list[float] = Field(default_factory=list, description="perturbation sizes (none: off)")
    attacks: list[Literal["pgd", "fgsm"]] = Field(default_factory=lambda: ["pgd", "fgsm"])
    examples: int = Field(1000, ge=1, description="test examples attacked (the first ones)")


class FalSection(AttackSettings):
    """Federated adversarial learning: clients train on PGD examples of their batches."""

    enabled: bool = False
    eps: float = Field(0.1, ge=0)
    clean_share: float = Field(0.0, ge=0, le=1, description="weight of the clean examples' loss "
                               "(the adversarial examples' is 1 - clean_share)")
    random_start: bool = True


class FedLabelSection(Section):
    """Semi-supervised clients (needs data.labels): a local expert trained on the labelled data, a
    model trained on pseudo-labels from the more expert of it and the global model, and the sum of
    both updates (FedLabel); `teacher = "global"` with `consistency = 0` is FedAvg + FixMatch with
    the global model."""

    enabled: bool = False
    teacher: Literal["select", "global", "local"] = Field(
        "select", description="who pseudo-labels: per example the more confident of the local expert "
        "and the global model (FedLabel), always the global, or always the local expert")
    confidence: Literal["variance", "max"] = Field(
        "variance", description="how confident an output is: the variance of its softmax vector "
        "(the paper's) or its maximum probability")
    threshold: float = Field(0.5, ge=0, le=1, description="keep a pseudo-label when its expert's "
                             "maximum softmax probability reaches this")
    unlabeled_weight: float = Field(1.0, ge=0, description="weight of the pseudo-label loss")
    consistency: float = Field(1.0, ge=0, description="weight lambda_0 of the global-local "
                               "consistency KL(trained || other model) on kept examples both label alike")
    unlabeled_ratio: int = Field(7, ge=1, description="unlabelled examples per labelled one in a "
                                 "step of the unlabelled model (FixMatch's mu)")
    weak: list[Literal["flip", "crop", "noise"]] | None = Field(
        None, description="augmentation of the teachers' view (default: none, as the paper's)")
    strong: list[Literal["flip", "crop", "cutout", "noise"]] | None = Field(
        None, description="augmentation of the trained model's view (default: flip, crop and "
        "cutout for images, noise for other inputs)")
    noise_std: float = Field(0.1, ge=0, description="std of the 'noise' augmentation (strong: twice it)")


class EvaluationSection(Section):
    every: int = Field(1, ge=1, description="central evaluation every N rounds (and the last)")
    class_groups: bool | None = Field(None, description="central accuracy on the many / medium / few "
                                      "classes of the training labels' long tail (default: on when "
                                      "data.partition.imbalance > 1)")
    client_fraction: float = Field(1.0, ge=0, le=1, description="clients evaluated locally")
    client_every: int = Field(1, ge=1)
    with_training: bool = Field(False, description="clients evaluate the global model they receive "
                                "before training it: round r's training message brings back the "
                                "local evaluation of round r-1's model (from round r's cohort), and "
                                "only the last model needs a message of its own")
    decomposition: bool = Field(False, description="loss decomposition (local, shift, aggregation) "
                                "at every central evaluation")
    decomposition_clients: int = Field(10, ge=1, description="clients it uses at most (m^2 evaluations)")
    fairness_data: Literal["train", "test"] = Field(
        "train", description="where clients count predictions per sensitive group for the fairness "
        "metrics and PID: their training data (as the PID paper's code) or local test splits")
    robust: RobustSection = Field(default_factory=RobustSection)


class EngineSection(Section):
    backend: Literal["ray", "inprocess"] = "ray"
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    ray_address: str = ""
    timeout: float = Field(3600.0, gt=0, description="seconds to wait for a round's replies")
    lockstep: bool = Field(True, description="train a worker's logistic-regression or MLP "
                           "clients together with batched matrix products (same result up to float "
                           "rounding, faster)")
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto", description="train a worker's other clients together as one torch.func program: "
        "'auto' on a GPU (on CPU it is rarely faster than one by one), 'on' always, 'off' never")
    channels_last: bool = Field(False, description="keep a worker's model in channels-last memory "
                                "order for one-by-one training and its evaluation (results equal up to "
                                "float rounding): on CPU 0.5-0.9x the time per step for the built-in "
                                "conv models (benchmarks/memory_format.py)")
    vectorize_memory_mb: float = Field(2048.0, gt=0, description="memory one vectorized program may "
                                       "use; a worker's clients go through in chunks that fit")
    max_failed_rounds: int = Field(3, ge=1, description="stop the run after this many consecutive "
                                   "rounds in which clients failed and none succeeded")
    on_divergence: Literal["stop", "keep"] = Field("stop", description="a non-finite global model or "
                                                   "training loss: stop the run, or keep the previous "
                                                   "model and go on")


class OutputSection(Section):
    dir: Path = Path("runs")
    run_dir: Path | None = Field(None, description="exact run directory (default: dir/name-time)")
    save_model: bool = True
    checkpoint_every: int | None = Field(None, ge=0, description="rounds between checkpoints "
                                         "(0: none; default: every 10th round, and after every "
                                         "round that took more than 2 s)")
    checkpoint_keep: int = Field(1, ge=1, description="checkpoints kept on disk (the newest)")
    mlflow: bool | str = Field(False, description="track the run in MLflow: true for a SQLite store "
                               "in output.dir (mlflow.db, no server), or a tracking URI")
    tensorboard: bool = Field(False, description="TensorBoard event files in <run dir>/tensorboard")


class DeploymentSection(Section):
    """Settings that only matter when real SuperNodes run the clients (`fedsim deploy`)."""

    central_test: str = Field("dataset", description="server-side test set: 'dataset' (the "
                              "experiment dataset's test split), 'none', or a .npz/.csv file")
    node_wait: float = Field(300.0, gt=0, description="seconds the server waits for "
                             "data.num_clients SuperNodes to connect")
    secure_aggregation: bool = Field(False, description="training rounds through Flower's SecAgg+: "
                                     "the server learns only the sum of the clients' weighted updates")
    secagg_shares: float = Field(1.0, gt=0, le=1, description="SecAgg+: the share of a round's "
                                 "clients each client's key is split among")
    secagg_threshold: float = Field(0.5, gt=0, le=1, description="SecAgg+: the share of those "
                                    "shares that rebuilds a key (a round survives while every client "
                                    "keeps that many active neighbours)")
    secagg_clipping_range: float = Field(8.0, gt=0, description="SecAgg+: each weighted update "
                                         "entry is clipped to [-range, range] before quantization")
    secagg_quantization_bits: int = Field(22, ge=8, le=30, description="SecAgg+: entries are "
                                          "quantized to 2^bits levels (the modulus is 2^32)")


class ExperimentConfig(Section):
    """The whole experiment: every section has defaults, so an empty file is a valid spec."""

    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    client: ClientSection = Field(default_factory=ClientSection)
    system: SystemSection = Field(default_factory=SystemSection)
    ggeur: GgeurSection = Field(default_factory=GgeurSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    dp_sgd: DpSgdSection = Field(default_factory=DpSgdSection)
    fal: FalSection = Field(default_factory=FalSection)
    fedlabel: FedLabelSection = Field(default_factory=FedLabelSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    output: OutputSection = Field(default_factory=OutputSection)
    deployment: DeploymentSection = Field(default_factory=DeploymentSection)

    def to_json_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict of every setting (paths as strings)."""
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a TOML-typed value (bare words are strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. experiment.seed=1)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A spec's values by dotted key: {"client": {"lr": 0.1}} -> {"client.lr": 0.1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set the dotted `key` (e.g. `data.partition.alpha`) in a nested raw config dict."""
    node = raw
    path = key.split(".")
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key=value` override into the nested raw config dict."""
    for text in overrides:
        path, value = parse_override(text)
        set_key(raw, ".".join(path), value)
    return raw


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"])
        hint = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown key '{key}'{suggestion} (allowed: {', '.join(allowed)})"
    return f"{key} = {error.get('input')!r}: {error['msg']}"


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Turn a raw nested dict into a typed config, or raise one ConfigError naming each bad key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid experiment config: " + "; ".join(problems)) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read an experiment TOML file, with a clear error when it is missing or malformed; plugin
    files it names (`file.py:Name`) are taken relative to its folder."""
    try:
        with open(path, "rb") as handle:
            return absolute_file_plugins(tomllib.load(handle), Path(path).parent)
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_config(path: Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a spec from TOML (or defaults when path is None) and apply `key=value` overrides.

    A comparison spec's `[compare]` grid is ignored: this is its base experiment."""
    raw = read_toml(path) if path is not None else {}
    raw.pop("compare", None)
    return validate_config(apply_overrides(raw, list(overrides)))
