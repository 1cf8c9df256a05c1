"""LoRA math invariants on tiny tensors and tiny models."""

import pytest
import torch

from mta_ray.core.lora import LoraPair, delta, fold_into, merge, merge_delta, merge_params, stack
from mta_ray.engine.multilora import FlatFactors, inject, set_merged, set_stacked, target_module_names
from mta_ray.files.peft_format import load_peft, save_peft
from tests.tiny import random_lora, tiny_gemma, tiny_llama, tiny_qwen2


def _rand_lora(seed, names=("a", "b"), r=3, d_in=7, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return {n: LoraPair(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                        torch.randn(d_out, r, generator=g, dtype=torch.float64)) for n in names}


def test_delta_merge_is_the_exact_weighted_sum_of_updates():
    loras = [_rand_lora(s) for s in range(3)]
    w = [0.5, 0.3, 0.2]
    merged = merge_delta(loras, w)
    for name in ("a", "b"):
        want = sum(wi * l[name].B @ l[name].A for wi, l in zip(w, loras))
        assert torch.allclose(delta(merged[name]), want)
        assert merged[name].A.shape[0] == 9  # rank K * r


def test_weight_minus_one_negates_in_delta_space_only():
    lora = _rand_lora(1)
    assert torch.allclose(delta(merge([lora], [-1.0], "delta")["a"]), -delta(lora["a"]))
    # params space scales A and B both: (-B)(-A) = BA, one reason the two spaces differ
    assert torch.allclose(delta(merge([lora], [-1.0], "params")["a"]), delta(lora["a"]))


def test_params_merge_mixes_factors_and_differs_from_delta():
    x, y = _rand_lora(2), _rand_lora(3)
    p = merge_params([x, y], [0.6, 0.4])
    assert torch.allclose(p["a"].A, 0.6 * x["a"].A + 0.4 * y["a"].A)
    assert torch.allclose(p["a"].B, 0.6 * x["a"].B + 0.4 * y["a"].B)
    cross = delta(p["a"]) - delta(merge_delta([x, y], [0.6, 0.4])["a"])
    want = 0.24 * (x["a"].B @ y["a"].A + y["a"].B @ x["a"].A) - 0.24 * (delta(x["a"]) + delta(y["a"]))
    assert torch.allclose(cross, want)  # exactly the cross terms


def test_one_lora_merges_to_itself_in_both_spaces():
    x = _rand_lora(4)
    for space in ("params", "delta"):
        assert torch.allclose(delta(merge([x], [1.0], space)["a"]), delta(x["a"]))


def test_merge_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        merge_delta([_rand_lora(0)], [0.5, 0.5])
    with pytest.raises(ValueError):
        merge_params([_rand_lora(0), _rand_lora(1, names=("a",))], [0.5, 0.5])


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gemma])
def test_folding_equals_the_frozen_factored_branch(factory):
    """method.md stage 3.2: W0 + B_m A_m folded == frozen merged branch beside W0."""
    ids = torch.randint(0, 96, (2, 9))
    folded = factory()
    names = target_module_names(folded, ["all-linear"])
    merged = merge_delta([random_lora(folded, names, 4, 1), random_lora(folded, names, 4, 2)], [0.7, 0.3])
    branch = factory()
    router, layers = inject(branch, ["all-linear"], slots=2, rank=4, merged_rank=8)
    set_merged(layers, 1, merged)
    router.rows = torch.tensor([1, 1])
    fold_into(folded, merged)
    with torch.no_grad():
        assert torch.allclose(branch(ids).logits, folded(ids).logits, atol=1e-5)


def test_each_row_uses_its_own_slot():
    model = tiny_llama()
    names = target_module_names(model, ["all-linear"])
    ref = tiny_llama()
    router, layers = inject(model, ["all-linear"], slots=3, rank=2, merged_rank=4, scale=2.0)
    loras = [random_lora(ref, names, 4, s) for s in range(3)]
    stacked = [random_lora(ref, names, 2, 10 + s) for s in range(3)]
    for s in range(3):
        set_merged(layers, s, loras[s])
        set_stacked(layers, s, stacked[s])
    ids = torch.randint(0, 96, (3, 6))
    router.rows = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(ids).logits
    for n, s in enumerate([2, 0, 1]):
        one = tiny_llama()
        fold_into(one, stack(loras[s], {k: LoraPair(p.A, 2.0 * p.B) for k, p in stacked[s].items()}))
        with torch.no_grad():
            assert torch.allclose(out[n], one(ids[n:n + 1]).logits[0], atol=1e-5)


def test_flat_factors_alias_the_layers_and_gather_their_gradients():
    """After flattening, each layer's factors and gradients are views of one (S, P) row per slot: slot
    writes show in the row, a backward fills the flat gradient, a row unpacks to the slot's adapter."""
    model = tiny_llama()
    names = target_module_names(model, ["all-linear"])
    router, layers = inject(model, ["all-linear"], slots=2, rank=2, scale=2.0)
    before = random_lora(tiny_llama(), names, 2, 5)
    set_stacked(layers, 1, before)
    flat = FlatFactors(layers)
    assert flat.data.shape == (2, sum(p[0].numel() for lay in layers.values() for p in (lay.lora_A, lay.lora_B)))
    for name, pair in flat.unpack(flat.data[1], fold_scale=False).items():  # values kept through the move
        assert torch.equal(pair.A, before[name].A) and torch.equal(pair.B, before[name].B)
    after = random_lora(tiny_llama(), names, 2, 6)
    set_stacked(layers, 0, after)                                             # a write through a layer ...
    for name, pair in flat.unpack(flat.data[0]).items():                      # ... is in slot 0's row
        assert torch.equal(pair.A, after[name].A) and torch.allclose(pair.B, 2.0 * after[name].B)
    row = flat.init_row(torch.Generator().manual_seed(3))                     # PEFT's init, seeded
    assert torch.equal(row, flat.init_row(torch.Generator().manual_seed(3)))
    for name, pair in flat.unpack(row, fold_scale=False).items():
        assert pair.A.abs().max() <= 1 / pair.A.shape[1] ** 0.5 and pair.A.std() > 0 and not pair.B.any()
    router.rows = torch.tensor([0, 0])
    model(torch.randint(0, 96, (2, 5))).logits.sum().backward()
    assert flat.grad[0].abs().sum() > 0 and flat.grad[1].abs().sum() == 0     # only slot 0's rows ran
    first = next(iter(layers.values()))
    assert first.lora_A.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
    assert torch.equal(first.lora_A.grad, flat.grad[:, :first.lora_A[0].numel()].view_as(first.lora_A))


def test_peft_export_loads_with_peft_and_reproduces_our_logits(tmp_path):
    from peft import PeftModel

    ours = tiny_llama()
    names = target_module_names(ours, ["all-linear"])
    merged = merge_delta([random_lora(ours, names, 4, 1), random_lora(ours, names, 4, 2)], [0.6, 0.4])
    stacked = random_lora(ours, names, 4, 3)
    router, layers = inject(ours, ["all-linear"], slots=1, rank=4, merged_rank=8, scale=1.0)
    set_merged(layers, 0, merged)
    set_stacked(layers, 0, stacked)
    router.rows = torch.tensor([0, 0])
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = ours(ids).logits
    save_peft(stack(merged, stacked), tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    with torch.no_grad():
        got = peft_model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    back = load_peft(tmp_path / "adapter")
    assert set(back) == set(names)
    assert torch.allclose(delta(back[names[0]]), delta(stack(merged, stacked)[names[0]]), atol=1e-6)


def test_peft_export_with_mixed_ranks(tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    names = target_module_names(base, ["q_proj", "v_proj"])
    lora = random_lora(base, names, 4, 5)
    odd = names[0]
    lora[odd] = random_lora(base, [odd], 6, 6)[odd]
    save_peft(lora, tmp_path / "a")
    ids = torch.randint(0, 96, (1, 5))
    folded = tiny_llama()
    fold_into(folded, lora)
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))(ids).logits,
                              folded(ids).logits, atol=1e-5)
    assert load_peft(tmp_path / "a")[odd].A.shape[0] == 6
