"""One harness for every capture rule: the rule's per-sample dot products with a random direction
equal ``torch.func`` per-sample gradients dotted with that direction (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inrun_shapley.capture import registered_types
from inrun_shapley.engine.capture_session import CaptureSession
from inrun_shapley.engine.tracked import plan_modules
from tests import oracles

N = 5


class Gate(nn.Module):
    """No dedicated rule: handled by the generic JVP rule."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.c = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.tanh(self.w) + self.c


class NestedGate(nn.Module):
    """No dedicated rule, outputs nested in a tuple, a dict and a named tuple (all read by the loss)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.c = nn.Parameter(torch.randn(d))

    def forward(self, x):
        y = x * torch.tanh(self.w)
        pair = torch.return_types.max((y.sin(), y.argmax(-1)))  # a named tuple (values, indices)
        return y + self.c, ({"a": y * self.c, "b": (y.exp(), "tag")}, pair)


def _nested_sum(f, x):
    y, (d, pair) = f(x)
    return torch.cat([y, d["a"], d["b"][0].cos(), pair.values], dim=-1)


def _recurrent(batch_first):
    """Every output of a recurrent layer, per row: ``out`` then ``h_n`` (and ``c_n``), samples first."""
    def call(f, x):
        out, h = f(x if batch_first else x.transpose(0, 1))
        out = out if batch_first else out.transpose(0, 1)
        hs = h if isinstance(h, tuple) else (h,)
        return torch.cat([out.flatten(1)] + [s.transpose(0, 1).flatten(1) for s in hs], dim=1)
    return call


def _bn_eval(module):
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(module.weight)
    nn.init.normal_(module.bias)
    return module.eval()


def _tokens(*shape, padding=None):
    t = torch.randint(0, 7, shape)
    if padding is not None:
        t[:, 0] = padding
    return t


# name -> (module factory, inputs factory, call(f, *inputs) -> output tensor)
CASES = {
    "linear_2d": (lambda: nn.Linear(4, 3), lambda: (torch.randn(N, 4),), None),
    "linear_seq": (lambda: nn.Linear(4, 6), lambda: (torch.randn(N, 3, 4),), None),
    "linear_no_bias": (lambda: nn.Linear(5, 2, bias=False), lambda: (torch.randn(N, 2, 5),), None),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), lambda: (torch.randn(N, 2, 6),), None),
    "conv2d_stride_groups": (lambda: nn.Conv2d(4, 4, 3, stride=2, groups=2), lambda: (torch.randn(N, 4, 7, 7),), None),
    "conv2d_reflect": (lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                       lambda: (torch.randn(N, 1, 5, 5),), None),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2), lambda: (torch.randn(N, 1, 3, 3, 3),), None),
    "embedding": (lambda: nn.Embedding(7, 3), lambda: (_tokens(N, 4),), None),
    "embedding_padding_idx": (lambda: nn.Embedding(7, 3, padding_idx=0), lambda: (_tokens(N, 4, padding=0),), None),
    "layernorm": (lambda: nn.LayerNorm(4), lambda: (torch.randn(N, 3, 4),), None),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((2, 3)), lambda: (torch.randn(N, 2, 3),), None),
    "rmsnorm": (lambda: nn.RMSNorm(4), lambda: (torch.randn(N, 3, 4),), None),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda: (torch.randn(N, 4, 3, 3),), None),
    "batchnorm_eval": (lambda: _bn_eval(nn.BatchNorm2d(3)), lambda: (torch.randn(N, 3, 2, 2),), None),
    "batchnorm1d_eval": (lambda: _bn_eval(nn.BatchNorm1d(3)), lambda: (torch.randn(N, 3),), None),
    "multihead_attention": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), lambda: (torch.randn(N, 3, 4),),
                            lambda f, x: f(x, x, x)[0]),
    "generic_jvp": (lambda: Gate(4), lambda: (torch.randn(N, 3, 4),), None),
    "generic_jvp_nested_outputs": (lambda: NestedGate(4), lambda: (torch.randn(N, 3, 4),), _nested_sum),
    "rnn": (lambda: nn.RNN(3, 4, num_layers=2, batch_first=True), lambda: (torch.randn(N, 4, 3),), _recurrent(True)),
    "gru_seq_first_bidirectional": (lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True),
                                    lambda: (torch.randn(N, 4, 3),), _recurrent(False)),
    "lstm_multilayer": (lambda: nn.LSTM(3, 4, num_layers=3, batch_first=True), lambda: (torch.randn(N, 4, 3),),
                        _recurrent(True)),
    "lstm_seq_first_proj": (lambda: nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True),
                            lambda: (torch.randn(N, 4, 3),), _recurrent(False)),
}
RECURRENT = {name for name in CASES if name.startswith(("rnn", "gru", "lstm"))}  # torch.func.vmap has no rule


def _call(call, f, *inputs):
    return f(*inputs) if call is None else call(f, *inputs)


def _param_dict_dot(module, inputs, call, weights, loop=False):
    """Per-row loss ``sum(out * weights)``: per-sample gradients dotted with a random direction."""
    directions = {n: torch.randn_like(p) for n, p in module.named_parameters()}

    def loss_of_row(f, *row):
        return (_call(call, f, *row) * weights[:1]).sum()

    ref = oracles.per_sample_direction_dots(module, loss_of_row, inputs, directions, loop=loop)
    return directions, ref


@pytest.mark.parametrize("name", list(CASES))
def test_rule_dot_equals_per_sample_gradients(name):
    torch.manual_seed(0)
    make_module, make_inputs, call = CASES[name]
    module = make_module().double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in make_inputs())
    weights = torch.randn_like(_call(call, module, *inputs)).detach()
    weights = weights[:1].expand_as(weights).contiguous()  # the same per-row loss for every row

    modules, _ = plan_modules(module, (), strict=True)
    ((mod_name, tracked),) = modules.items()
    session = CaptureSession(modules)
    session.attach()
    session.begin(torch.arange(N))
    (_call(call, module, *inputs) * weights).sum().backward()
    session.end()
    session.detach()

    directions, ref = _param_dict_dot(module, inputs, call, weights, loop=name in RECURRENT)
    by_name = dict(module.named_parameters())
    rel = {pn: pn for pn in tracked.params}
    dirs = {pn: directions[rel[pn]].unsqueeze(0) for pn in tracked.params if by_name[pn].requires_grad}
    theta = {pn: p.detach().clone() for pn, p in tracked.params.items()} if tracked.rule.reads_parameters else None
    got = 0
    for cap in session.pending[0].captures[mod_name]:
        per_row = tracked.rule.dot(module, cap, dirs, theta)
        got = got + per_row.reshape(N, -1, per_row.shape[-1]).sum(1)
    assert got.shape == (N, 1)
    assert oracles.relative_error(got[:, 0], ref) <= 1e-10, (got[:, 0], ref)


def test_every_registered_kind_is_in_the_harness():
    covered = {type(CASES[name][0]()).__name__ for name in CASES}
    missing = set(registered_types()) - covered - {"_BatchNorm"}
    assert not missing, f"capture rules without a harness case: {sorted(missing)}"
