"""What the capture session sees, end to end through the tracker: nested and recurrent outputs,
modules shared by every sample (position embeddings), the number of ids, BatchNorm in training
mode, validation dtypes and optimizer subclasses.

Values are checked against ``torch.func`` per-sample gradients: under plain SGD with the
``sgd`` estimator a sample's value is ``lr * <g_val, grad of its share of the training loss>``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import SampleIdError, ShapleyTracker, UnsupportedModuleError
from tests import oracles

LR = 0.1


def sgd_values_and_reference(model, rows_loss, rows, val, ids=None, loop=False, **tracker_kwargs):
    """One SGD step under the tracker, and the reference values from per-sample gradients.

    Args:
        rows_loss: ``fn(forward, *rows) -> [B]`` per-sample losses; training and validation
            losses are their means.
        rows: the training batch (tuple of tensors, samples first); ``val`` the validation one.
    """
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=lambda m, b: rows_loss(m, *b),
                             estimator="sgd", **tracker_kwargs)
    b = rows[0].shape[0]
    grads = (oracles.per_sample_grads_loop if loop else oracles.per_sample_grads)(
        model, lambda f, *row: rows_loss(f, *row).sum(), rows)
    g_val = oracles.loss_grad(model, lambda f: rows_loss(f, *val).mean())
    ref = torch.stack([LR * oracles.dot(g_val, {k: v[i] / b for k, v in grads.items()}) for i in range(b)])
    with tracker.batch(torch.arange(b) if ids is None else ids):
        rows_loss(model, *rows).mean().backward()
    opt.step()
    opt.zero_grad()
    got = torch.as_tensor(tracker.store.last_record[2])
    tracker.detach()
    return got, ref, tracker


# ---------------------------------------------------------------- nested / recurrent outputs
class RecurrentHead(nn.Module):
    """A recurrent layer whose head reads the last output and every layer's final state."""

    def __init__(self, cell, batch_first, **kwargs):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 4, batch_first=batch_first, **kwargs)
        layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
        n_states = 2 if cell is nn.LSTM else 1
        self.head = nn.Linear(4 * (2 if kwargs.get("bidirectional") else 1) + 4 * layers * n_states, 2)

    def forward(self, x):
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        states = state if isinstance(state, tuple) else (state,)  # LSTM: (h_n, c_n)
        return self.head(torch.cat([last] + [s.transpose(0, 1).flatten(1) for s in states], dim=1))


def _mse(f, x, y):
    return ((f(x) - y) ** 2).mean(1)


@pytest.mark.parametrize("cell, batch_first, kwargs", [
    (nn.LSTM, True, {}),  # float32 on CPU: the oneDNN kernel, no forward-mode derivative
    (nn.LSTM, False, {"num_layers": 2}),
    (nn.GRU, True, {"num_layers": 2, "bidirectional": True}),
    (nn.RNN, False, {"num_layers": 3}),
])
def test_recurrent_states_read_by_the_head_are_valued_exactly(cell, batch_first, kwargs):
    torch.manual_seed(0)
    model = RecurrentHead(cell, batch_first, **kwargs)
    x, y = torch.randn(6, 5, 3), torch.randn(6, 2)
    val = (torch.randn(4, 5, 3), torch.randn(4, 2))
    got, ref, tracker = sgd_values_and_reference(model, _mse, (x, y), val, loop=True)
    assert oracles.relative_error(got, ref) <= 1e-4, (got, ref)
    assert abs(float(got.sum() - ref.sum())) <= 1e-4 * float(ref.abs().sum())  # the step total
    assert {r.name: r.status for r in tracker.report()}["rnn"] == "tracked"


def test_recurrent_layer_on_a_packed_sequence_is_refused_with_the_fix():
    model = RecurrentHead(nn.GRU, True)
    val = (torch.randn(4, 5, 3), torch.randn(4, 2))
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=val,
                             val_loss_fn=lambda m, b: _mse(m, *b))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    with pytest.raises(UnsupportedModuleError, match="PackedSequence.*padded batch"):
        with tracker.batch([0, 1]):
            model.rnn(packed)


# ---------------------------------------------------------------- shared modules (positions)
class TinyGPT(nn.Module):
    """Token + position embedding, one causal attention block, a head applied to the positions
    flattened sample-major (``[B*T, d]``, as ``logits.view(-1, vocab)`` code does)."""

    def __init__(self, positions="row", vocab=11, d=8, t_max=8):
        super().__init__()
        self.positions = positions
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t_max, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        position_ids = torch.arange(t)
        if self.positions == "row":  # GPT-2: position_ids of shape [1, T]
            position_ids = position_ids[None]
        h = self.tok(tokens) + self.pos(position_ids)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        h = self.ln(h + a)
        return self.head(h.reshape(-1, h.shape[-1]))  # [B*T, vocab]


def _next_token_loss(f, tokens):
    """Per-sample mean of the per-token cross-entropy (``[B]``)."""
    logits = f(tokens[:, :-1])
    per_token = F.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="none")
    return per_token.view(tokens.shape[0], -1).mean(1)


def test_position_embedding_shared_by_the_batch_is_valued_exactly():
    torch.manual_seed(0)
    model = TinyGPT("row").double()
    tokens = torch.randint(0, 11, (4, 7))
    val = (torch.randint(0, 11, (3, 7)),)
    got, ref, tracker = sgd_values_and_reference(model, _next_token_loss, (tokens,), val)
    assert oracles.relative_error(got, ref) <= 1e-10, (got, ref)
    assert {r.name: r.status for r in tracker.report()}["pos"] == "tracked"


def test_position_embedding_alone_gets_each_samples_share():
    """Only the position embedding is trained: a shared module's value is still per sample."""
    torch.manual_seed(1)
    model = TinyGPT("row").double()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("pos."))
    tokens = torch.randint(0, 11, (3, 6))
    val = (torch.randint(0, 11, (2, 6)),)
    got, ref, _ = sgd_values_and_reference(model, _next_token_loss, (tokens,), val)
    assert oracles.relative_error(got, ref) <= 1e-10, (got, ref)
    assert float(got.std()) > 0  # not one shared number


class PositionsViewed(TinyGPT):
    """``pos(torch.arange(L))[None, :T]`` and a cast before meeting the batch: followed through."""

    def forward(self, tokens):
        t = tokens.shape[1]
        pos = self.pos(torch.arange(8))[None, :t].to(self.tok.weight.dtype)  # a table of 8, sliced
        h = self.tok(tokens) + pos
        return self.head(self.ln(h).reshape(-1, h.shape[-1]))


@pytest.mark.parametrize("model_cls, b, t", [
    (TinyGPT, 4, 7), (TinyGPT, 4, 9), (TinyGPT, 3, 4), (TinyGPT, 1, 5),  # T = 6, 8 (a multiple of B), 3 (= B), B = 1
    (PositionsViewed, 4, 9), (PositionsViewed, 3, 7),
])
def test_position_embedding_without_a_batch_dimension_is_valued_exactly(model_cls, b, t):
    """nanoGPT's ``pos(torch.arange(T))``, ``[T, d]``, used directly or through a view, a slice
    and a cast: exact whatever T is to B (never read as flattened rows), the model unchanged."""
    torch.manual_seed(2)
    model = model_cls("flat").double()
    tokens = torch.randint(0, 11, (b, t))
    val = (torch.randint(0, 11, (2, t)),)
    got, ref, _ = sgd_values_and_reference(model, _next_token_loss, (tokens,), val)
    assert oracles.relative_error(got, ref) <= 1e-10, (got, ref)


class PositionsPerSample(TinyGPT):
    """Positions built inside the model and expanded to the batch (``arange(T).expand(B, T)``):
    the call has the batch's rows, but its input is not the model's, so it is watched until it
    meets the batch, here row for row."""

    def forward(self, tokens):
        b, t = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(t).expand(b, t))
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.reshape(-1, h.shape[-1]))


def test_positions_that_meet_the_batch_row_for_row_are_exact_and_leave_the_op_stream(monkeypatch):
    """Valued as per-sample rows (exact), and the op watch leaves once the positions have met the
    batch: the rest of the forward runs without a Python call per op (before, it stayed for the
    whole forward, waiting for a broadcast that never comes)."""
    from inrun_shapley.capture.sites import BroadcastWatch

    torch.manual_seed(3)
    model = PositionsPerSample("flat").double()
    tokens = torch.randint(0, 11, (4, 7))
    val = (torch.randint(0, 11, (2, 7)),)
    got, ref, _ = sgd_values_and_reference(model, _next_token_loss, (tokens,), val)
    assert oracles.relative_error(got, ref) <= 1e-10, (got, ref)

    seen = []
    handler = BroadcastWatch.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(BroadcastWatch, "__torch_function__", counting)
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=val,
                             val_loss_fn=lambda m, b: _next_token_loss(m, *b))
    with tracker.batch(torch.arange(4)):
        _next_token_loss(model, tokens).mean().backward()
    tracker.detach()
    assert "add" in seen  # the positions met the batch under the watch
    # it leaves at the next tracked module's hook (after the attention): nothing later is seen
    assert not {"layer_norm", "linear", "cross_entropy"} & set(seen), seen


class PositionsUsedTwice(TinyGPT):
    """The position table also enters the loss without meeting the batch: not splittable."""

    def forward(self, tokens):
        t = tokens.shape[1]
        pos = self.pos(torch.arange(t))
        h = self.tok(tokens) + pos
        return self.head(h.reshape(-1, h.shape[-1]) + pos.sum())


def test_position_output_also_used_without_the_batch_is_refused():
    model = PositionsUsedTwice("flat")
    tokens = torch.randint(0, 11, (4, 7))
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=(tokens,),
                             val_loss_fn=lambda m, b: _next_token_loss(m, *b))
    with pytest.raises(SampleIdError, match=r"module 'pos', called without the batch dimension, was used again"):
        with tracker.batch(torch.arange(4)):
            _next_token_loss(model, tokens).mean().backward()


# ---------------------------------------------------------------- number of ids
def test_fewer_ids_than_samples_is_refused_even_when_they_divide_the_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=(x, x[:, :1]),
                             val_loss_fn=lambda m, b: _mse(m, *b))
    with pytest.raises(SampleIdError, match=r"4 sample ids, but no tracked module was called on 4 rows.*\[8\]"):
        with tracker.batch(torch.arange(4)):
            model(x).pow(2).mean().backward()


def test_one_row_for_several_ids_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=(torch.randn(2, 3),
                             torch.randn(2, 1)), val_loss_fn=lambda m, b: _mse(m, *b))
    with pytest.raises(SampleIdError, match=r"shared by the batch's 3 sample ids, but the model's input had first "
                                            r"dimension \[1\]"):
        with tracker.batch([0, 1, 2]):
            model(torch.randn(1, 3)).pow(2).mean().backward()


# ---------------------------------------------------------------- BatchNorm in training mode
def _bn_model(**bn_kwargs):
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, **bn_kwargs), nn.Linear(4, 1))


def _tracker(model, **kwargs):
    return ShapleyTracker(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
                          val_data=(torch.randn(4, 3), torch.randn(4, 1)), val_loss_fn=lambda m, b: _mse(m, *b),
                          **kwargs)


def _frozen_bn():
    model = _bn_model()
    model[1].requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [
    lambda: _bn_model(affine=False),
    _frozen_bn,
    lambda: _bn_model(track_running_stats=False).eval(),  # eval mode, but batch statistics
])
def test_any_batchnorm_using_batch_statistics_is_refused_with_the_fix(make):
    with pytest.raises(UnsupportedModuleError, match=r"1 \(BatchNorm1d\): BatchNorm in training mode couples.*"
                                                     r"eval mode.*GroupNorm/LayerNorm.*strict=False"):
        _tracker(make())


def test_excluding_a_batchnorm_does_not_hide_the_coupling():
    with pytest.raises(UnsupportedModuleError, match="couples the samples"):
        _tracker(_bn_model(), exclude=["1"])


def test_untracked_batchnorm_switched_to_training_is_caught_at_forward():
    model = _bn_model(affine=False).eval()
    tracker = _tracker(model)
    model.train()
    with pytest.raises(UnsupportedModuleError, match="'1' \\(BatchNorm1d\\): BatchNorm in training mode couples"):
        with tracker.batch([0, 1, 2, 3]):
            model(torch.randn(4, 3))


def test_strict_false_accepts_batchnorm_in_training_with_one_warning():
    torch.manual_seed(0)
    model = _bn_model()
    with pytest.warns(UserWarning, match="BatchNorm in training mode .* approximate"):
        tracker = _tracker(model, strict=False)
    assert {r.name: r.status for r in tracker.report()}["1"].startswith("unsupported: BatchNorm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the forward check warns only for a module switched later
        with tracker.batch([0, 1, 2, 3]):
            model(torch.randn(4, 3)).pow(2).mean().backward()
    tracker.optimizer.step()
    assert tracker.values.shape == (4,)


# ---------------------------------------------------------------- validation dtype
class FeaturesAndTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x, tokens):
        return self.head(torch.tanh(self.lin(x) + self.emb(tokens).mean(1)))


def test_float64_validation_set_for_a_float32_model_is_cast():
    torch.manual_seed(0)
    model = FeaturesAndTokens()
    x, tokens, y = torch.randn(4, 2), torch.randint(0, 5, (4, 3)), torch.randn(4, 1)
    val64 = (torch.randn(3, 2, dtype=torch.float64), torch.randint(0, 5, (3, 3)),
             torch.randn(3, 1, dtype=torch.float64))
    val32 = (val64[0].float(), val64[1], val64[2].float())
    loss = lambda f, xx, tt, yy: ((f(xx, tt) - yy) ** 2).mean(1)  # noqa: E731

    def run(val):
        m = FeaturesAndTokens()
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        tracker = ShapleyTracker(m, opt, val_data=val, val_loss_fn=lambda mm, b: loss(mm, *b), estimator="sgd")
        with tracker.batch(torch.arange(4)):
            loss(m, x, tokens, y).mean().backward()
        opt.step()
        return torch.as_tensor(tracker.store.last_record[2])

    assert torch.equal(run(val64), run(val32))  # token ids stay integers, features and targets float32


# ---------------------------------------------------------------- optimizer subclasses
class MyAdam(torch.optim.Adam):
    """Overrides step() and calls the parent's: both steps are hooked by torch."""

    def step(self, closure=None):
        return super().step(closure)


def test_adam_subclass_overriding_step_after_a_plain_adam():
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # wraps torch.optim.Adam.step for the process
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = MyAdam(model.parameters(), lr=1e-2)
    tracker = ShapleyTracker(model, opt, val_data=(torch.randn(4, 3), torch.randn(4, 1)),
                             val_loss_fn=lambda m, b: _mse(m, *b))
    with tracker.batch(torch.arange(4)):
        model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    assert tracker.step == 1 and tracker.values.shape == (4,)


# ---------------------------------------------------------------- raw parameters beside children
class SlicedPositions(nn.Module):
    """A raw position table sliced before it meets the batch: no per-sample reading of it."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 8, 3))
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(x + self.pos_embed[:, : x.shape[1]]).mean(1)


def test_raw_parameter_used_without_broadcasting_over_the_batch_is_refused():
    model = SlicedPositions()
    x = torch.randn(4, 5, 3)
    tracker = ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=LR), val_data=(x, x[:, 0, :1]),
                             val_loss_fn=lambda m, b: _mse(m, *b))
    assert {r.name: r.rule for r in tracker.report()}[""] == "parameter-sites"
    with pytest.raises(UnsupportedModuleError, match=r"parameter 'pos_embed' of module '<root>'.*exclude=\[''\]"):
        with tracker.batch(torch.arange(4)):
            _mse(model, x, x[:, 0, :1]).mean().backward()


class LayerScaled(nn.Module):
    """A raw layer-scale parameter beside a child layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.gamma = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, x):
        return self.gamma * self.lin(x)


class Wrapper(nn.Module):
    """Like a LightningModule whose training step calls ``self.net(x)``, not its own forward."""

    def __init__(self):
        super().__init__()
        self.net = LayerScaled()

    def forward(self, x):
        return self.net(x)


def test_raw_parameter_is_watched_when_the_models_own_forward_is_bypassed():
    torch.manual_seed(4)
    model = Wrapper().double()
    x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
    val = (torch.randn(3, 3).double(), torch.randn(3, 2).double())

    def rows_loss(f, a, b):
        return ((getattr(f, "net", f)(a) - b) ** 2).mean(1)  # the tracked run calls model.net directly

    got, ref, tracker = sgd_values_and_reference(model, rows_loss, (x, y), val)
    assert {r.name: r.rule for r in tracker.report()}["net"] == "parameter-sites"
    assert oracles.relative_error(got, ref) <= 1e-10, (got, ref)
