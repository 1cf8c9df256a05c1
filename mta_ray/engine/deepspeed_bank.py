"""Anchor training with DeepSpeed ZeRO on Ray Train, for bases that do not fit one GPU (``bank.engine: deepspeed``).

A Ray Train ``TorchTrainer`` starts ``bank.deepspeed.workers`` workers (one GPU each on a GPU
cluster, CPU processes otherwise). They load the base once (with ZeRO-3 its weights are sharded
as it loads: no worker ever holds the whole model) and then train the anchors one after another,
data-parallel (ZeRO-3: one run per anchor, see :func:`train_anchors`): each anchor's micro-batches are split among the workers, DeepSpeed averages the
gradients and shards the optimizer state (ZeRO-2) and the weights too (ZeRO-3), optionally in host
memory (``offload: cpu``). The recipe is the bank's (rank, alpha, targets, lr, epochs, batch,
accumulation, warmup + cosine, clipping). Worker 0 writes each trained anchor as a PEFT adapter into
a staging folder; :func:`mta_ray.stages.bank.run_bank` files them into the bank like the multi-slot ones.

Run: ``mta-ray bank CONFIG bank.engine=deepspeed bank.deepspeed.workers=8 --out DIR``
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mta_ray.config import Config, to_dict

STAGING = ".deepspeed-staging"


def ds_config(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config of the bank's recipe (the LR schedule is set per step by the loop)."""
    b, d = cfg.bank, cfg.bank.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": b.batch_size,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": b.max_grad_norm if b.max_grad_norm > 0 else 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": b.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": b.weight_decay}},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def _load_base(cfg: Config, ds: dict[str, Any], dtype: Any) -> tuple[Any, Any]:
    """The base, sharded while it loads under ZeRO-3 (transformers' HfDeepSpeedConfig / zero.Init)."""
    import deepspeed
    # LlamaForCausalLM is imported here, before zero.Init patches torch's tensor constructors: imported
    # inside it, torch.compile's decorators in transformers fail their signature check.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig

    from mta_ray.files.models import load_tokenizer, model_source, random_model, random_shape

    keep_alive = HfDeepSpeedConfig(ds) if ds["zero_optimization"]["stage"] == 3 else None  # noqa: F841
    tok = load_tokenizer(cfg.model)
    shape = random_shape(cfg.model.base)
    if shape:
        with deepspeed.zero.Init(config_dict_or_path=ds, enabled=keep_alive is not None):
            model = random_model(shape, dtype, None, min_vocab=len(tok))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, tok


def _micro_batches(n: int, batch: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: every rank gets the same number (collectives stay in step),
    a short rank repeating from its start."""
    from mta_ray.engine.trainer import epoch_order

    order = epoch_order(n, seed, epoch)
    per_step = batch * world
    steps = max(1, math.ceil(n / per_step))
    mine = [order[(s * per_step + rank * batch + j) % n] for s in range(steps) for j in range(batch)]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def _lora_of(peft_model: Any, scale: float, stage: int) -> dict[str, Any]:
    """The trained factors in our form (module path -> A, B with the scaling folded in), on the CPU."""
    import deepspeed

    from mta_ray.core.lora import LoraPair

    params = {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        full = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    out = {}
    for name, A in full.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        out[module] = LoraPair(A, full[name.replace(".lora_A.", ".lora_B.")] * scale)
    return out


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the base once, then train every anchor of ``config['payload']`` in turn."""
    import ray.train
    import torch

    from mta_ray.config import Config, build
    from mta_ray.core.tasks import get_task
    from mta_ray.engine.encoding import job_examples
    from mta_ray.files.models import torch_dtype

    cfg: Config = build(Config, config["cfg"], "<bank.deepspeed>")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch_dtype(cfg.model.dtype, device)
    ds = ds_config(cfg, dtype == torch.bfloat16)
    model, tok = _load_base(cfg, ds, dtype)
    task = get_task(cfg.data.task)
    staging = Path(config["staging"])
    report: dict[str, dict[str, Any]] = {}
    for anchor in config["payload"]:
        examples = job_examples(task, anchor, tok, cfg, config.get("negatives") or [])
        model, report[anchor["user_id"]] = _train_anchor(cfg, ds, model, tok, examples, anchor["user_id"],
                                                         rank, world, device, staging)
    if rank == 0:  # files, not ray.train.report: metrics without a checkpoint do not reach the Result
        (staging / "report.json").write_text(json.dumps(report))


def _train_anchor(cfg: Config, ds: dict[str, Any], model: Any, tok: Any, examples: list[Any], anchor_id: str,
                  rank: int, world: int, device: str, staging: Path) -> tuple[Any, dict[str, Any]]:
    """Train one anchor's LoRA (data-parallel over the ranks); rank 0 writes it into ``staging``.
    Returns the bare base again (the adapter unloaded) and the anchor's report row."""
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model

    from mta_ray.core.lora import peft_target_modules
    from mta_ray.engine.trainer import lr_multiplier, pad_examples, user_seed
    from mta_ray.files.peft_format import save_peft

    b = cfg.bank
    seed = user_seed(cfg.seed, anchor_id)
    torch.manual_seed(seed)  # the same LoRA initialisation on every rank
    peft_model = get_peft_model(model, LoraConfig(r=b.rank, lora_alpha=b.alpha, lora_dropout=b.dropout,
                                                  target_modules=peft_target_modules(b.target_modules),
                                                  task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(model=peft_model, config=ds,
                                      model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
    total = b.epochs * math.ceil(math.ceil(len(examples) / (b.batch_size * world)) / b.grad_accum)
    step, losses = 0, []
    engine.train()
    for epoch in range(b.epochs if examples else 0):
        micro = _micro_batches(len(examples), b.batch_size, world, rank, seed, epoch)
        window_loss = 0.0
        for i, idx in enumerate(micro):
            for group in engine.optimizer.param_groups:
                group["lr"] = b.lr * lr_multiplier(step, max(total, 1), b)
            ids, att, lab = pad_examples([examples[j] for j in idx], tok.pad_token_id, device)
            loss = engine(input_ids=ids, attention_mask=att, labels=lab).loss
            engine.backward(loss)
            engine.step()
            window_loss += float(loss.detach()) / b.grad_accum
            if (i + 1) % b.grad_accum == 0 or i + 1 == len(micro):
                losses.append(window_loss)
                window_loss, step = 0.0, step + 1
    lora = _lora_of(peft_model, b.alpha / b.rank, b.deepspeed.zero_stage)
    if rank == 0:
        save_peft(lora, staging / anchor_id, base_model=cfg.model.base)
    final = losses[-1] if losses else float("nan")
    row = {"steps": step, "final_loss": final, "status": "ok" if examples and math.isfinite(final) else "failed",
           "error": "" if examples else "no training examples"}
    model = peft_model.unload()  # the bare base again for the next anchor
    del engine, peft_model
    return model, row


def train_anchors(cfg: Config, payload: list[dict[str, Any]], bank_dir: Path,
                  negatives: list[tuple[str, str]] | None = None) -> dict[str, dict[str, Any]]:
    """Train ``payload``'s anchors ({user_id: anchor id, histories, owners}) with DeepSpeed; results like the
    multi-slot workers' (user_id, lora, steps, final_loss, status, error). ``negatives``: as the workers'."""
    import shutil

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mta_ray.files.peft_format import load_peft

    staging = bank_dir / STAGING
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    # ZeRO-3 shards the base's weights, and a sharded model cannot take a second PEFT adapter after the
    # first is unloaded (DeepSpeed's parameter bookkeeping breaks): one Ray Train run per anchor there,
    # every anchor in one run (one base load) at ZeRO-2.
    groups = [payload] if cfg.bank.deepspeed.zero_stage == 2 else [[a] for a in payload]
    out = {}
    for i, group in enumerate(groups):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": to_dict(cfg), "payload": group, "staging": str(staging.resolve()),
                               "negatives": negatives or []},
            scaling_config=ScalingConfig(num_workers=cfg.bank.deepspeed.workers, use_gpu=use_gpu),
            run_config=RunConfig(name=f"bank-deepspeed-{i}",
                                 storage_path=str((bank_dir.parent / "ray_train").resolve())),
        )
        trainer.fit()
        report = json.loads((staging / "report.json").read_text())
        for aid, r in report.items():
            lora = load_peft(staging / aid) if r["status"] == "ok" else None
            out[aid] = {"user_id": aid, "lora": lora, **r}
        print(f"bank[deepspeed]: {len(out)}/{len(payload)} anchors", flush=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out
