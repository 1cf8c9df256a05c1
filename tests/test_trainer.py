"""The multi-slot trainer trains each user exactly as plain PEFT trains that user alone."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mta_ray.config import LoraTrainConfig
from mta_ray.core.lora import LoraPair, delta, fold_into, merge_delta, peft_target_modules
from mta_ray.engine import lora_kernels
from mta_ray.engine.multilora import target_module_names
from mta_ray.engine.trainer import Example, Job, MultiSlotTrainer, epoch_order, lr_multiplier, plan_windows, user_seed
from tests.tiny import random_lora, tiny_llama

FACTOR_ATOL = 1e-4
"""Trained factors agree with PEFT's to float32 summation-order noise (up to ~3e-5 seen across CPUs and
library versions after 8 AdamW steps at lr 2e-2); a dropped or misplaced branch is off by far more."""

CFG = LoraTrainConfig(rank=4, alpha=8, lr=2e-2, epochs=2, batch_size=2, grad_accum=2, warmup_ratio=0.2,
                      max_grad_norm=0.5, target_modules=["all-linear"])


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(4, 12, (1,), generator=g))
        t = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(1, 96, (p + t,), generator=g).tolist()
        out.append(Example(ids, [-100] * p + ids[p:]))
    return out


def _jobs(stacked_targets=("all-linear",)):
    """3 users (3/5/8 items); the merged LoRA on every linear (the bank's modules), the stacked adapter's
    initial factors on ``stacked_targets``."""
    ref = tiny_llama()
    names = target_module_names(ref, ["all-linear"])
    stacked_names = target_module_names(ref, stacked_targets)
    jobs = []
    for k, n in enumerate([3, 5, 8]):
        merged = None if k == 0 else merge_delta(
            [random_lora(ref, names, 4, 100 + k), random_lora(ref, names, 4, 200 + k)], [0.6, 0.4])
        init = {nm: LoraPair(p.A * 4, p.B)
                for nm, p in random_lora(ref, stacked_names, 4, 300 + k, scale=0.1).items()}
        jobs.append(Job(f"user{k}", _examples(n, k), merged=merged, init=init, seed=7))
    return jobs


def _train_alone_with_peft(job: Job, cfg: LoraTrainConfig):
    """The reference: the paper's form (merged LoRA folded into W0) + a plain PEFT LoRA, torch AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    model = tiny_llama()
    if job.merged:
        fold_into(model, job.merged)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                  target_modules=peft_target_modules(cfg.target_modules)))
    params = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            module.lora_A["default"].weight.data.copy_(job.init[key].A)
            module.lora_B["default"].weight.data.copy_(job.init[key].B)
            params[key] = module
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    windows = plan_windows(len(job.examples), cfg, user_seed(job.seed, job.user_id))
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(len(windows) * cfg.warmup_ratio), len(windows))
    losses = []
    for window in windows:
        n_tok = sum(job.examples[i].target_tokens for mb in window for i in mb)
        total = 0.0
        for mb in window:
            batch = [job.examples[i] for i in mb]
            T = max(len(e.input_ids) for e in batch)
            ids = torch.tensor([e.input_ids + [0] * (T - len(e.input_ids)) for e in batch])
            att = torch.tensor([[1] * len(e.input_ids) + [0] * (T - len(e.input_ids)) for e in batch])
            lab = torch.tensor([e.labels + [-100] * (T - len(e.labels)) for e in batch])
            logits = peft_model(input_ids=ids, attention_mask=att).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tok
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    scale = cfg.alpha / cfg.rank
    trained = {k: LoraPair(m.lora_A["default"].weight.detach().clone(),
                           m.lora_B["default"].weight.detach().clone() * scale) for k, m in params.items()}
    return trained, losses


@pytest.fixture(scope="module")
def references():
    return {job.user_id: _train_alone_with_peft(job, CFG) for job in _jobs()}


@pytest.mark.parametrize("slots,max_rows,kernel", [(3, 0, "bmm"), (2, 0, "bmm"), (1, 0, "bmm"), (3, 1, "bmm")]
                         + ([(3, 0, "triton"), (2, 0, "triton")] if lora_kernels.runs_on("cpu") else []))
def test_slots_train_like_plain_peft_alone(slots, max_rows, kernel, references):
    """3 users with 3/5/8 items; with 2 or 1 slots, slots are refilled mid-run; max_rows=1 splits
    every iteration into one pass per sequence; the LoRA branches by batched matmuls or Triton kernels."""
    trainer = MultiSlotTrainer(tiny_llama(), CFG, slots=slots, merged_rank=8, max_rows=max_rows, lora_kernel=kernel)
    results = {r.user_id: r for r in trainer.run(_jobs())}
    assert set(results) == {"user0", "user1", "user2"}
    for user, (want_lora, want_losses) in references.items():
        got = results[user]
        assert got.status == "ok"
        assert got.steps == len(want_losses)
        assert got.step_losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
        for name, pair in want_lora.items():
            assert torch.allclose(got.lora[name].A, pair.A, atol=FACTOR_ATOL), name
            assert torch.allclose(got.lora[name].B, pair.B, atol=FACTOR_ATOL), name
    # training moved the adapters and lowered the loss
    first = references["user2"][1]
    assert first[-1] < first[0]


QV = dataclasses.replace(CFG, target_modules=["q_proj", "v_proj"])


def test_merged_branch_covers_the_banks_modules_when_the_stacked_adapter_has_fewer():
    """Bank on every linear, stacked adapter on q/v: the merged LoRA still acts on every linear (the
    reference folds all of it into W0), and only q/v are trained and returned."""
    jobs = _jobs(QV.target_modules)
    trainer = MultiSlotTrainer(tiny_llama(), QV, slots=2, merged_rank=8, merged_targets=["all-linear"])
    assert len(trainer.layers) == len(target_module_names(tiny_llama(), ["all-linear"]))
    results = {r.user_id: r for r in trainer.run(jobs)}
    for job in jobs:
        want_lora, want_losses = _train_alone_with_peft(job, QV)
        got = results[job.user_id]
        assert got.status == "ok" and set(got.lora) == set(want_lora) == set(job.init)
        assert got.step_losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
        for name, pair in want_lora.items():
            assert torch.allclose(got.lora[name].A, pair.A, atol=FACTOR_ATOL), name
            assert torch.allclose(got.lora[name].B, pair.B, atol=FACTOR_ATOL), name


def test_a_merged_lora_on_modules_without_a_merged_branch_is_refused():
    """The bug this guards: merged LoRAs silently cut down to the stacked adapter's modules."""
    jobs = _jobs(QV.target_modules)
    trainer = MultiSlotTrainer(tiny_llama(), QV, slots=1, merged_rank=8)  # merged branch on q/v only
    with pytest.raises(ValueError, match="no merged branch"):
        trainer.run(jobs[1:2])


def test_refilled_slot_trains_like_a_fresh_run():
    jobs = _jobs()
    fresh = MultiSlotTrainer(tiny_llama(), CFG, slots=1, merged_rank=8).run([jobs[2]])[0]
    reused = {r.user_id: r for r in MultiSlotTrainer(tiny_llama(), CFG, slots=1, merged_rank=8).run(jobs)}
    assert reused["user2"].step_losses == pytest.approx(fresh.step_losses, rel=1e-6)
    for name, pair in fresh.lora.items():
        assert torch.allclose(reused["user2"].lora[name].B, pair.B, atol=1e-6)


def test_default_init_is_peft_like_and_seeded_by_user():
    jobs = [Job("a", _examples(2, 0)), Job("b", _examples(2, 1))]
    cfg = LoraTrainConfig(rank=2, alpha=2, lr=1e-9, epochs=1, batch_size=2, grad_accum=1, warmup_ratio=0.0)
    r1 = {r.user_id: r for r in MultiSlotTrainer(tiny_llama(), cfg, slots=2).run(jobs)}
    r2 = {r.user_id: r for r in MultiSlotTrainer(tiny_llama(), cfg, slots=1).run(jobs)}
    name = next(iter(r1["a"].lora))
    assert torch.allclose(r1["a"].lora[name].A, r2["a"].lora[name].A)
    assert not torch.allclose(r1["a"].lora[name].A, r1["b"].lora[name].A)
    assert r1["a"].lora[name].A.abs().max() <= 1 / math.sqrt(32) + 1e-6
    assert delta(r1["a"].lora[name]).abs().max() < 1e-6  # B starts at zero


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_diverging_user_fails_alone(device):
    """Losses reach the host one iteration late: the diverged user has run one more micro-batch by
    then, on its own rows only; its neighbours train exactly as without it."""
    jobs = _jobs()
    cfg = LoraTrainConfig(**{**CFG.__dict__, "max_grad_norm": 0.0})
    bad = jobs[1]
    with torch.no_grad():
        bad.init = {k: LoraPair(p.A, torch.full_like(p.B, float("nan"))) for k, p in bad.init.items()}

    def train(slots, batch):
        model = tiny_llama().to(device)
        return {r.user_id: r for r in MultiSlotTrainer(model, cfg, slots=slots, merged_rank=8, fused=False).run(batch)}

    results = train(3, jobs)
    assert results["user1"].status == "failed" and "non-finite loss at step 1" in results["user1"].error
    assert results["user1"].lora is None and results["user1"].steps == 0
    ok = train(1, [jobs[0], jobs[2]])
    for u in ("user0", "user2"):
        assert results[u].status == "ok"
        assert results[u].step_losses == pytest.approx(ok[u].step_losses, rel=1e-5)


def test_a_user_diverging_at_its_last_step_fails_once():
    """A one-step user is done (slot freed, refilled) before its loss is read: it still fails, once."""
    cfg = LoraTrainConfig(**{**CFG.__dict__, "epochs": 1, "max_grad_norm": 0.0})
    jobs = _jobs()
    bad = Job("bad", _examples(3, 9), init={k: LoraPair(p.A, torch.full_like(p.B, float("nan")))
                                          for k, p in jobs[0].init.items()}, seed=7)
    results = MultiSlotTrainer(tiny_llama(), cfg, slots=1, merged_rank=8).run([bad, jobs[0]])
    assert [(r.user_id, r.status) for r in results] == [("bad", "failed"), ("user0", "ok")]


def test_schedule_and_windows():
    cfg = LoraTrainConfig(epochs=2, batch_size=2, grad_accum=2, warmup_ratio=0.1)
    w = plan_windows(5, cfg, seed=3)
    assert [len(x) for x in w] == [2, 1, 2, 1]          # 3 micro-batches per epoch -> windows of 2 and 1
    assert sorted(i for win in w[:2] for mb in win for i in mb) == list(range(5))
    assert epoch_order(5, 3, 0) != epoch_order(5, 3, 1)
    assert lr_multiplier(0, 10, cfg) == 0.0 and lr_multiplier(1, 10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(9, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused,kernel", [(False, "bmm"), (True, "bmm"), (True, "triton")])
def test_cuda_pass_without_host_waits_trains_like_cpu(fused, kernel):
    """On CUDA the pass copies its inputs from pinned memory without blocking and reads losses back once per
    optimizer step; the users still train as on the CPU (fp32; with or without the compiled kernels and the
    fused gated MLP; the LoRA branches by batched matmuls or the Triton kernels)."""
    cpu = {r.user_id: r for r in MultiSlotTrainer(tiny_llama(), CFG, slots=2, merged_rank=8, max_rows=3).run(_jobs())}
    gpu_model = tiny_llama().cuda()
    gpu = {r.user_id: r for r in MultiSlotTrainer(gpu_model, CFG, slots=2, merged_rank=8, max_rows=3,
                                                  fused=fused, lora_kernel=kernel).run(_jobs())}
    assert set(gpu) == set(cpu)
    for user, want in cpu.items():
        got = gpu[user]
        assert got.status == "ok" and got.steps == want.steps
        assert got.step_losses == pytest.approx(want.step_losses, rel=1e-3, abs=1e-4)
        for name, pair in want.lora.items():
            assert torch.allclose(got.lora[name].B, pair.B, atol=1e-4), name
