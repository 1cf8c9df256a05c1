"""Invariants of fitting a LoRA into a served rank (random tensors, float64 truths)."""

import typing

import pytest
import torch

from mta_ray.config import ExportConfig
from mta_ray.core.lora import LoraPair, delta
from mta_ray.core.lowrank import SERVED_RANKS, combine, fit_rank, pad, served_rank, truncate, update_error


def pair(r, out=24, inp=20, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return LoraPair(torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype))


def test_served_ranks_are_the_configs_choices():
    assert tuple(typing.get_args(typing.get_type_hints(ExportConfig)["max_rank"])) == SERVED_RANKS


def test_truncation_is_the_svd_optimum_and_reports_its_error():
    p = pair(12)
    full = delta(p)
    for k in (1, 3, 8):
        fitted, fit = truncate(p, k)
        assert fitted.A.shape == (k, 20) and fitted.B.shape == (24, k)
        s = torch.linalg.svdvals(full)
        best = full - (lambda u, s_, vh: u[:, :k] * s_[:k] @ vh[:k])(*torch.linalg.svd(full, full_matrices=False))
        assert torch.allclose(delta(fitted), full - best, atol=1e-9)               # Eckart-Young optimum
        assert fit.kept_energy == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-10)
        assert fit.rel_error == pytest.approx(update_error(fitted, p), rel=1e-9)
        assert fit.rel_error ** 2 + fit.kept_energy == pytest.approx(1.0)
        assert fit.rank == 12


def test_a_pair_that_fits_is_returned_exactly():
    p = pair(6)
    fitted, fit = truncate(p, 8)
    assert fitted is p and fit.kept_energy == 1.0 and fit.rel_error == 0.0


def test_rank_deficient_update_truncates_exactly():
    """Two branches sharing a factor: combined rank 8 but update rank 4, so a rank-4 fit loses nothing."""
    p = pair(4, seed=1)
    doubled = combine({"m": p}, {"m": LoraPair(p.A, -0.5 * p.B)})["m"]
    assert doubled.A.shape[0] == 8
    fitted, fit = truncate(doubled, 4)
    assert fit.kept_energy == pytest.approx(1.0) and fit.rel_error < 1e-7
    assert torch.allclose(delta(fitted), 0.5 * delta(p), atol=1e-10)


def test_zero_padding_is_exact_and_never_shrinks():
    p = pair(5)
    padded = pad(p, 8)
    assert padded.A.shape == (8, 20) and padded.B.shape == (24, 8)
    assert torch.equal(delta(padded), delta(p)) and pad(p, 5) is p
    with pytest.raises(ValueError):
        pad(p, 4)


def test_combine_sums_branches_on_the_union_of_their_modules():
    merged = {"q": pair(8, seed=1), "k": pair(8, seed=2)}
    stacked = {"q": pair(4, seed=3), "v": pair(4, seed=4)}
    both = combine(merged, stacked)
    assert set(both) == {"q", "k", "v"}
    assert both["q"].A.shape[0] == 12 and both["k"].A.shape[0] == 8 and both["v"].A.shape[0] == 4
    assert torch.allclose(delta(both["q"]), delta(merged["q"]) + delta(stacked["q"]))
    assert torch.equal(delta(both["k"]), delta(merged["k"])) and torch.equal(delta(both["v"]), delta(stacked["v"]))


@pytest.mark.parametrize("needed,cap,want", [(4, 16, 8), (8, 16, 8), (12, 16, 16), (20, 16, 16), (20, 32, 32),
                                             (1, 16, 1), (0, 16, 1), (300, 512, 320), (600, 512, 512)])
def test_served_rank_is_the_smallest_accepted_rank_that_holds_the_update(needed, cap, want):
    assert served_rank(needed, cap) == want


def test_served_rank_refuses_a_cap_vllm_does_not_take():
    with pytest.raises(ValueError):
        served_rank(4, 20)


def test_fit_rank_gives_one_rank_exact_where_it_fits_truncated_where_not():
    lora = {"both": combine({"x": pair(16, seed=1)}, {"x": pair(4, seed=2)})["x"], "one": pair(6, seed=3)}
    fitted, rank, fits = fit_rank(lora, 16)
    assert rank == 16 and {p.A.shape[0] for p in fitted.values()} == {16}
    assert fits["one"].rel_error == 0.0 and torch.allclose(delta(fitted["one"]), delta(lora["one"]))
    assert 0 < fits["both"].rel_error < 1 and fits["both"].rank == 20
    assert fits["both"].rel_error == pytest.approx(update_error(fitted["both"], lora["both"]), rel=1e-9)
    fitted, rank, fits = fit_rank(lora, 32)                        # cap above the need: exact, padded to 32
    assert rank == 32 and all(f.rel_error == 0.0 for f in fits.values())
    assert all(torch.allclose(delta(fitted[n]), delta(lora[n])) for n in lora)


def test_float32_factors_keep_their_dtype_and_balance():
    p = pair(12, out=64, inp=48, dtype=torch.float32)
    fitted, fit = truncate(p, 8)
    assert fitted.A.dtype == fitted.B.dtype == torch.float32
    assert torch.allclose(fitted.A.norm(dim=1), fitted.B.norm(dim=0), rtol=1e-4)    # sqrt(S) on each side
    assert update_error(fitted, p) == pytest.approx(fit.rel_error, rel=1e-4)


def test_modules_of_one_shape_are_fitted_together_exactly_as_one_at_a_time():
    lora = {f"layers.{i}.q": pair(20, seed=i) for i in range(5)}
    lora["layers.0.o"] = LoraPair(torch.zeros(20, 20, dtype=torch.float64), torch.zeros(24, 20, dtype=torch.float64))
    fitted, rank, fits = fit_rank(lora, 16)
    assert list(fitted) == list(lora) and rank == 16
    for name, p in lora.items():
        one, fit = truncate(p, 16)
        assert torch.allclose(delta(fitted[name]), delta(one), atol=1e-9)
        assert fits[name].kept_energy == pytest.approx(fit.kept_energy) and fits[name].rank == 20
    assert fits["layers.0.o"] == (20, 1.0, 0.0) and not fitted["layers.0.o"].B.any()    # a zero update
