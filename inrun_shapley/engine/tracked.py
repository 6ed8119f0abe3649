"""Which modules and parameters a tracker covers: one capture rule per module, checked up front."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import nn

from inrun_shapley.capture import JVP_RULE, CaptureRule, rule_for
from inrun_shapley.capture.norm import BATCH_STATISTICS, uses_batch_statistics
from inrun_shapley.capture.sites import PARAMETER_SITE_RULE
from inrun_shapley.errors import ConfigurationError, UnsupportedModuleError

__all__ = ["ModuleReport", "TrackedModule", "TrackedModules", "TrackedParameters", "plan_modules", "plan_parameters",
           "trained_signature", "untracked_trained", "warn_batch_statistics"]


@dataclass
class ModuleReport:
    """One row of :meth:`ShapleyTracker.report`: how a module with trainable parameters is handled."""

    name: str
    type: str
    rule: str
    parameters: list[str]
    status: str  # "tracked", "excluded", or "unsupported: <reason>"


class TrackedModule(NamedTuple):
    """A tracked module, its capture rule and the trainable parameters the rule accounts for."""

    module: nn.Module
    rule: CaptureRule
    params: dict[str, nn.Parameter]


class TrackedModules(dict):
    """``{qualified name: TrackedModule}``, plus what the capture session watches besides them.

    Attributes:
        batch_norms: ``{qualified name: module}`` of every BatchNorm of the model, tracked or
            not: one in training mode couples the samples of a batch (checked at each forward).
        strict: raise on such coupling (else warn once: values approximate).
        root: the model, whose input's first dimension tells how many samples a batch has.
    """

    def __init__(self, *args, batch_norms: dict[str, nn.Module] | None = None, strict: bool = True,
                 root: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_norms = dict(batch_norms or {})
        self.strict = strict
        self.root = root


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in prefixes)


def plan_modules(model: nn.Module, exclude: Iterable[str], strict: bool,
                 stacklevel: int = 3) -> tuple[TrackedModules, list[ModuleReport]]:
    """Pick a capture rule for every module with trainable parameters (MRO lookup, else the JVP rule).

    Any BatchNorm of the model that normalizes with batch statistics (training mode) is refused
    too, tracked or not, excluded or not: it couples the samples, so every layer's values would
    be approximate.

    Args:
        model: the model.
        exclude: module names (or name prefixes) left out of the values.
        strict: raise on modules that cannot be tracked and on a BatchNorm in training mode;
            else exclude the former and accept approximate values with one warning each.
        stacklevel: of those warnings.

    Returns:
        ``(TrackedModules, one report row per module with trainable parameters)``.

    Raises:
        UnsupportedModuleError: a module cannot be tracked or a BatchNorm is in training mode,
            and ``strict`` (every such module is listed with its reason), or nothing can be tracked.
    """
    exclude = tuple(exclude)
    batch_norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    coupled = [(name, type(m).__name__, BATCH_STATISTICS) for name, m in batch_norms.items()
               if uses_batch_statistics(m)]
    modules = TrackedModules(batch_norms=batch_norms, strict=strict, root=model)
    reports: list[ModuleReport] = []
    owned: set[str] = set()
    problems = []
    for name, module in model.named_modules():
        if "" in owned or _under(name, owned):  # "" : the root's rule owns the whole model
            continue
        rule = rule_for(module) or _generic_rule(module)
        params = rule.parameters(module)
        if not params:
            continue
        row = lambda status: ModuleReport(name, type(module).__name__, rule.kind, list(params), status)  # noqa: E731
        if _under(name, exclude):
            reports.append(row("excluded"))
            continue
        reason = rule.check(module)
        if reason:
            if reason != BATCH_STATISTICS:  # listed with every coupling BatchNorm
                problems.append((name, type(module).__name__, reason))
            reports.append(row(f"unsupported: {reason}"))
            continue
        modules[name] = TrackedModule(module, rule, params)
        reports.append(row("tracked"))
        if rule.owns_children:
            owned.add(name)
    if problems or coupled:
        lines = "\n".join(f"  - {n or '<root>'} ({t}): {r}" for n, t, r in problems + coupled)
        if strict:
            raise UnsupportedModuleError(
                f"{len(problems) + len(coupled)} module(s) cannot be tracked:\n{lines}\n"
                "Fix them, or pass exclude=[names] (or strict=False) to leave their parameters out"
                + (" (a BatchNorm in training mode: see its line)." if coupled else ".")
            )
    if problems and not strict:
        lines = "\n".join(f"  - {n or '<root>'} ({t}): {r}" for n, t, r in problems)
        warnings.warn(f"inrun-shapley leaves these modules' parameters out of the values:\n{lines}", stacklevel=stacklevel)
    if coupled and not strict:
        warn_batch_statistics([n for n, _, _ in coupled], stacklevel=stacklevel)
    if not modules:
        raise UnsupportedModuleError("the model has no trainable parameters that can be tracked")
    return modules, reports


def _generic_rule(module: nn.Module) -> CaptureRule:
    """A module without a registered rule: its own parameters through a forward-mode replay of
    the module, unless a child module has trainable parameters too. A replay would run those
    children at their post-step weights (wrong in proportion to the learning rate), so such
    raw parameters (a ViT's ``pos_embed`` and ``cls_token``, a block's layer-scale ``gamma``)
    are read at their use sites instead (:mod:`~inrun_shapley.capture.sites`)."""
    if any(p.requires_grad for child in module.children() for p in child.parameters()):
        return PARAMETER_SITE_RULE
    return JVP_RULE


def warn_batch_statistics(names: list[str], stacklevel: int) -> None:
    """The one warning of ``strict=False`` for BatchNorms normalizing with batch statistics."""
    warnings.warn(
        f"BatchNorm in training mode ({', '.join(n or '<root>' for n in names)}) couples the samples of "
        "a batch: with strict=False the values are approximate, and a trainable BatchNorm's own "
        "parameters are left out (put it in eval mode or use GroupNorm/LayerNorm for exact values)",
        stacklevel=stacklevel,
    )


class TrackedParameters(NamedTuple):
    """The parameters scored at each step: tracked by a module and updated by the optimizer."""

    params: list[nn.Parameter]  # in module order, each once (tied weights included once)
    param_group: list[int]  # index of each parameter's optimizer param group
    untracked_optimized: list[str]  # names of optimized parameters no tracked module covers


def plan_parameters(model: nn.Module, modules: dict[str, TrackedModule],
                    optimizer: torch.optim.Optimizer) -> TrackedParameters:
    """The tracked modules' parameters that ``optimizer`` updates.

    Raises:
        ConfigurationError: none of them is in the optimizer.
    """
    in_optimizer = {id(p): gi for gi, group in enumerate(optimizer.param_groups) for p in group["params"]}
    params: list[nn.Parameter] = []
    groups: list[int] = []
    seen: set[int] = set()
    for tracked in modules.values():
        for p in tracked.params.values():
            if id(p) not in seen and id(p) in in_optimizer:
                seen.add(id(p))
                params.append(p)
                groups.append(in_optimizer[id(p)])
    untracked = [n for n, p in model.named_parameters() if id(p) in in_optimizer and id(p) not in seen]
    if not params:
        raise ConfigurationError("none of the model's tracked parameters is in the optimizer")
    return TrackedParameters(params, groups, untracked)


def trained_signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """What the optimizer will update: the ids of its parameters that require gradients, in group
    order (one pass over the groups: cheap enough to compare at every micro-batch)."""
    return tuple(id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad)


def untracked_trained(model: nn.Module, optimizer: torch.optim.Optimizer, planned: tuple[int, ...]) -> list[str]:
    """Names of the parameters the optimizer updated at this step (it holds a gradient for them:
    call from the step post-hook) that the plan ``planned`` left out."""
    known = set(planned)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "<not in the model>") for p in dict.fromkeys(
        p for group in optimizer.param_groups for p in group["params"]
        if p.requires_grad and p.grad is not None and id(p) not in known)]
