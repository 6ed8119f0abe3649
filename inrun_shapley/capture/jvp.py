"""Generic rule: forward-mode JVP of the module in the direction ``M``, dotted with ``b``.

For any module ``y = f(a; theta)`` whose rows do not interact (row n of y depends only on row n
of the inputs), ``<dL_n/dtheta, M> = <b_n, J_theta f(a_n) M>``: one forward-mode pass of the
module on its captured inputs per direction, exact. The forward is replayed with the random
state of the original call so dropout inside the module draws the same mask, under the autocast
the call ran under (mixed precision: GPT-2's ``Conv1D`` multiplies bf16 activations by fp32
weights only through autocast), and with scaled-dot-product attention on its math kernel (the
fused kernels have no forward-mode rule).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from inrun_shapley.capture.outputs import tensor_leaves
from inrun_shapley.capture.registry import Capture, CaptureRule, register_rule, up
from inrun_shapley.errors import UnsupportedModuleError


def _replay_rng(state):
    """Context that restores the captured RNG state for the replayed forward, then undoes it."""
    devices = [torch.cuda.current_device()] if state and state[1] is not None else []
    ctx = torch.random.fork_rng(devices=devices, enabled=state is not None)

    class _Replay:
        def __enter__(self):
            ctx.__enter__()
            if state is not None:
                torch.set_rng_state(state[0])
                if state[1] is not None:
                    torch.cuda.set_rng_state(state[1])

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)

    return _Replay()


def _tensor_outputs(out) -> list[Tensor]:
    """Every tensor output of a call, at any nesting depth (see :func:`tensor_leaves`)."""
    return tensor_leaves(out)


def _rows_sum(t: Tensor, g: Tensor, dim: int, n: int) -> Tensor:
    """``[n]``: ``sum(t * g)`` over everything but dimension ``dim`` (of size ``n``)."""
    return (up(t) * up(g)).movedim(dim, 0).reshape(n, -1).sum(1)


class JVPRule(CaptureRule):
    """Fallback for modules with parameters and no dedicated rule (exact, one JVP per direction).

    Every floating tensor output counts, at any nesting depth, each summed over everything but
    its row dimension (:meth:`~inrun_shapley.capture.registry.CaptureRule.output_sample_dims`).
    """

    kind = "jvp"
    needs_rng = True
    reads_parameters = True

    def replay_context(self):
        """Context of the replayed forward: scaled-dot-product attention on its math kernel (the
        fused kernels have no forward-mode derivative)."""
        return sdpa_kernel([SDPBackend.MATH])

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        params = {name: p.detach() for name, p in self.parameters(module).items()}
        if theta is not None:  # linearize where the gradients were taken, not where the step went
            params.update(theta)
        n = self.rows(module, capture.args, capture.kwargs)
        q = next(iter(directions.values())).shape[0]
        cols = []
        for i in range(q):
            tangents = {
                name: (directions[name][i].to(p.dtype) if name in directions else torch.zeros_like(p))
                for name, p in params.items()
            }

            slots: list[int] = []
            dims: list[int] = []

            def forward(theta):
                outs = _tensor_outputs(functional_call(module, theta, capture.args, capture.kwargs))
                dims[:] = self.output_sample_dims(module, outs)
                slots[:] = [k for k, o in enumerate(outs) if o.is_floating_point()]
                return tuple(outs[k] for k in slots)  # jvp takes floating tensor outputs only

            try:
                with _replay_rng(capture.rng_state), self.replay_context(), capture.replay_autocast():
                    _, out_tangents = jvp(forward, (params,), (tangents,))
            except NotImplementedError as err:  # an operation without a forward-mode derivative
                raise UnsupportedModuleError(
                    f"{type(module).__name__}: the generic capture rule needs forward-mode derivatives, "
                    f"and an operation of this module has none ({str(err).splitlines()[0]}); pass "
                    "exclude=[<this module's name>] to leave its parameters out of the values"
                ) from None
            col = torch.zeros(n, dtype=up(next(iter(directions.values()))).dtype, device=next(iter(params.values())).device)
            for k, t in zip(slots, out_tangents):
                g = capture.grad_outputs[k] if k < len(capture.grad_outputs) else None
                if g is not None:
                    col = col + _rows_sum(t, g, dims[k], n)
            cols.append(col)
        return torch.stack(cols, dim=1)


JVP_RULE = JVPRule()


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(JVPRule):
    """``nn.MultiheadAttention`` uses its ``out_proj`` weights functionally (the child's forward is
    never called), so the rule owns the whole subtree and differentiates the module as one."""

    kind = "attention-jvp"
    owns_children = True

    def check(self, module: nn.Module) -> str | None:
        if not module.batch_first:
            return (
                "nn.MultiheadAttention with batch_first=False puts the sequence first; the tracker "
                "needs the sample dimension first: construct it with batch_first=True"
            )
        return None
