"""The per-row AdamW steps each row exactly as torch's AdamW (with clip_grad_norm_) steps it alone."""

import torch

from mta_ray.core.optim import adamw_coefficients, adamw_rows_


def test_rows_step_like_torch_adamw_alone_with_their_own_lr_clip_and_step_count():
    torch.manual_seed(0)
    S, P, betas, eps, wd, clip = 4, 37, (0.9, 0.999), 1e-8, 0.01, 0.5
    init = torch.randn(S, P)
    lrs = [1e-2, 3e-3, 5e-2, 1e-3]
    grads_by_step = [torch.randn(S, P) * (1 + 3 * i) for i in range(5)]
    # rows 0 and 2 step every time; row 1 every other time; row 3 never
    stepping = [[0, 1, 2], [0, 2], [0, 1, 2], [0, 2], [0, 1, 2]]

    params, grads = init.clone(), torch.zeros(S, P)
    m, v = torch.zeros(S, P), torch.zeros(S, P)
    steps = [0] * S
    for g, rows in zip(grads_by_step, stepping):
        grads += g                      # every row accumulates; only the stepping rows step (and are zeroed)
        for r in rows:
            steps[r] += 1
        coef = adamw_coefficients([lrs[r] for r in rows], [steps[r] for r in rows], betas)
        adamw_rows_(params, grads, m, v, torch.tensor(rows), coef, betas, eps, wd, clip)
        assert torch.all(grads[rows] == 0)

    for r in range(S):
        ref = torch.nn.Parameter(init[r].clone())
        opt = torch.optim.AdamW([ref], lr=lrs[r], betas=betas, eps=eps, weight_decay=wd)
        acc = torch.zeros(P)
        for g, rows in zip(grads_by_step, stepping):
            acc += g[r]
            if r in rows:
                ref.grad = acc.clone()
                torch.nn.utils.clip_grad_norm_([ref], clip)
                opt.step()
                acc.zero_()
        torch.testing.assert_close(params[r], ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(params[3], init[3]) and torch.equal(m[3], torch.zeros(P))   # never stepped: untouched
