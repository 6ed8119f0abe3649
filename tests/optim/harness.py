"""One harness for every optimizer family: run torch's real step and compare the pure functions.

For a table of optimizer settings (two param groups each), a few real steps with gradients of
changing scale (so amsgrad's maximum is both kept and replaced); before every step the state is
copied, after it the pure functions are checked against what ``opt.step()`` did.
"""

from __future__ import annotations

import copy

import torch
from torch.func import jvp

from inrun_shapley.optim import adapter_for

SCALES = (1.0, 0.3, 2.0, 0.5, 1.5)


def make_optimizer(cls, kwargs: dict, dtype: torch.dtype, seed: int = 0):
    """Two parameters in two param groups; the second group has half the learning rate."""
    gen = torch.Generator().manual_seed(seed)
    p1 = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=dtype))
    p2 = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=dtype))
    lr = kwargs.get("lr", 0.01)
    if isinstance(lr, torch.Tensor):  # torch computes lr/(1-β1^t) in lr's dtype: keep it the parameters'
        lr = lr.to(dtype)
        kwargs = {**kwargs, "lr": lr}
    second = {"params": [p2], "lr": lr * 0.5}
    opt = cls([{"params": [p1]}, second], **kwargs)
    return opt, [p1, p2], gen


def run_steps(cls, kwargs: dict, dtype: torch.dtype, steps: int = len(SCALES)):
    """Yield one record per (step, parameter): what the pure functions need and what torch did."""
    opt, params, gen = make_optimizer(cls, kwargs, dtype)
    adapter = adapter_for(opt)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    for s in range(steps):
        for p in params:
            p.grad = SCALES[s] * torch.randn(p.shape, generator=gen, dtype=dtype)
        pre = []
        for p in params:
            group = groups[id(p)]
            pre.append(dict(
                theta=p.detach().clone(), g=p.grad.detach().clone(),
                state=copy.deepcopy(dict(opt.state[p])),
                before=adapter.before_step(group, opt.state[p]),
            ))
        opt.step()
        for p, r in zip(params, pre):
            r.update(step=s + 1, adapter=adapter, group=groups[id(p)], theta_after=p.detach().clone(),
                     state_after=copy.deepcopy(dict(opt.state[p])))
            yield r


def assert_step_matches(r, update, state: dict, rel: float):
    """``θ + update(g, state)`` equals torch's ``θ_{t+1}`` within ``rel`` of the step (plus the
    rounding of θ itself)."""
    delta = update(r["g"], r["theta"], r["group"], state)
    real = r["theta_after"] - r["theta"]
    eps = torch.finfo(r["theta"].dtype).eps
    tol = rel * float(real.abs().max()) + 4 * eps * r["theta"].abs()
    err = (r["theta"] + delta - r["theta_after"]).abs()
    assert bool((err <= tol).all()), f"step {r['step']}: max error {float(err.max()):.3g}, step size {float(real.abs().max()):.3g}"


def assert_jacobian_matches_autograd(r, update, update_jacobian_diag, state: dict):
    """``update_jacobian_diag`` equals the forward-mode derivative of ``update`` (fp64): the diagonal
    from a jvp with ones, and the full Jacobian is diagonal."""
    g, theta, group = r["g"], r["theta"], r["group"]
    fn = lambda x: update(x, theta, group, state)  # noqa: E731
    _, diag = jvp(fn, (g,), (torch.ones_like(g),))
    got = update_jacobian_diag(g, theta, group, state)
    assert got.shape == g.shape
    torch.testing.assert_close(got, diag, rtol=1e-10, atol=1e-14)
    full = torch.func.jacfwd(lambda x: fn(x.view_as(g)).reshape(-1))(g.reshape(-1))
    off = full - torch.diag(torch.diagonal(full))
    assert float(off.abs().max()) == 0.0
