"""adam_step (the compiled step's Adam) against Adam written out by hand in float64."""
import math

import pytest
import torch

from iql_torchrl.step.adam import adam_step

BETAS, EPS, LR, STEPS = (0.9, 0.999), 1e-8, 1e-2, 4


def hand_adam(param, grads, weight_decay, decoupled, bias_correction=True):
    """Kingma & Ba's Adam (Loshchilov & Hutter's decoupled decay) in float64, one element list at a time."""
    p = param.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decoupled:
            p = p * (1 - LR * weight_decay)
        else:
            g = g + weight_decay * p
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        c1 = 1 - BETAS[0] ** t if bias_correction else 1.0
        c2 = 1 - BETAS[1] ** t if bias_correction else 1.0
        p = p - LR / c1 * m / (torch.sqrt(v) / math.sqrt(c2) + EPS)
    return p


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_step_matches_hand_adam(compiled, weight_decay, decoupled):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(STEPS)]
    start = [p.clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    lr = torch.tensor(LR)

    def step(grad_list):
        adam_step(params, grad_list, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=BETAS, eps=EPS,
                  weight_decay=weight_decay, decoupled_weight_decay=decoupled)

    fn = torch.compile(step, fullgraph=True) if compiled else step
    for grad_list in grads:
        fn(grad_list)
    assert [float(s) for s in steps] == [STEPS] * len(params)
    for i, p in enumerate(params):
        expected = hand_adam(start[i], [gs[i] for gs in grads], weight_decay, decoupled)
        torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)
        # the wrong variant: no bias correction (also: L2 where decay is decoupled, and vice versa)
        assert not torch.allclose(p.double(), hand_adam(start[i], [gs[i] for gs in grads], weight_decay, decoupled,
                                                        bias_correction=False), rtol=1e-5, atol=1e-6)
        if weight_decay:
            other = hand_adam(start[i], [gs[i] for gs in grads], weight_decay, not decoupled)
            assert not torch.allclose(p.double(), other, rtol=1e-5, atol=1e-6)
