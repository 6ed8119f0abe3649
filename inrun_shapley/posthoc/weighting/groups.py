"""Parameter groups: an ordered partition of a model's trainable parameters into named groups.

Also the small helpers every module of this package uses to talk about group names: a short
listing for error messages, the names of a :class:`ParameterGroups` or a plain sequence, and the
check that two sets of group names agree.

Example:
    >>> import torch
    >>> from inrun_shapley.posthoc.weighting import ParameterGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> ParameterGroups.per_module(model).names
    ('0', '2')
    >>> ParameterGroups.per_tensor(model).names
    ('0.weight', '0.bias', '2.weight', '2.bias')
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from inrun_shapley.errors import ConfigurationError

_ROOT = "(root)"


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``, in ``model.named_parameters()`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def listing(names: Sequence[str], limit: int = 12) -> str:
    """``'a', 'b', ... (n more)``: at most ``limit`` names, for error messages."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class ParameterGroups:
    """An ordered partition of a model's trainable parameters into named groups.

    Every trainable parameter (``requires_grad=True``, in ``model.named_parameters()`` order)
    belongs to exactly one group; frozen parameters belong to none. Build one with
    :meth:`per_tensor`, :meth:`per_module`, :meth:`by_pattern` or :meth:`from_dict`; each
    gathers every problem (unassigned, duplicated, unknown, frozen parameters, empty groups)
    into one :class:`~inrun_shapley.errors.ConfigurationError`.

    Attributes:
        names: group names, in order (this order indexes the first axis of components and
            the weight vectors).
        members: ``{group name: tuple of parameter names}``, parameters in model order.
        param_names: all trainable parameter names, in model order.
    """

    def __init__(self, members: Mapping[str, Sequence[str]], param_names: Sequence[str]):
        """Validate a ``{group: [parameter names]}`` partition of ``param_names``.

        Prefer the classmethods, which compute ``param_names`` from a model.

        Args:
            members: group name → parameter names, in the desired group order.
            param_names: the trainable parameter names of the model, in model order.

        Raises:
            ConfigurationError: a parameter is unknown, assigned twice or unassigned, or a
                group is empty; the message lists all offenders.
        """
        param_names = list(param_names)
        known = set(param_names)
        owner: dict[str, list[str]] = {}
        problems: list[str] = []
        unknown: list[str] = []
        empty: list[str] = []
        for group, names in members.items():
            if isinstance(names, str):
                names = [names]
            if len(names) == 0:
                empty.append(group)
            for name in names:
                if name not in known:
                    unknown.append(name)
                owner.setdefault(name, []).append(group)
        duplicated = {n: g for n, g in owner.items() if len(g) > 1}
        unassigned = [n for n in param_names if n not in owner]
        if unknown:
            problems.append(f"not trainable parameters of the model: {listing(unknown)}")
        if duplicated:
            dup = "; ".join(f"{n!r} in {g}" for n, g in list(duplicated.items())[:12])
            problems.append(f"assigned to more than one group: {dup}")
        if unassigned:
            problems.append(f"in no group: {listing(unassigned)}")
        if empty:
            problems.append(f"empty groups: {listing(empty)}")
        if problems:
            raise ConfigurationError(
                "Invalid parameter groups; every trainable parameter must belong to exactly one "
                "group. Problems: " + " | ".join(problems) + ". Fix the grouping (or add a "
                "default group) and try again."
            )
        order = {n: k for k, n in enumerate(param_names)}
        self.names: tuple[str, ...] = tuple(str(g) for g in members)
        self.members: dict[str, tuple[str, ...]] = {
            str(g): tuple(sorted(([ns] if isinstance(ns, str) else ns), key=order.__getitem__))
            for g, ns in members.items()
        }
        self.param_names: tuple[str, ...] = tuple(param_names)
        self._group_of = {n: g for g, ns in self.members.items() for n in ns}

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def per_tensor(cls, model: nn.Module) -> ParameterGroups:
        """One group per trainable parameter tensor, named by its qualified name."""
        names = trainable_names(model)
        return cls({n: [n] for n in names}, names)

    @classmethod
    def per_module(cls, model: nn.Module, depth: int | None = None) -> ParameterGroups:
        """One group per module that owns trainable parameters.

        Args:
            model: the model.
            depth: if given, group by the first ``depth`` components of the owning module's
                qualified name instead (``depth=2`` puts ``blocks.0.attn.q.weight`` in group
                ``blocks.0``). Parameters owned by the root module go to group ``"(root)"``.
        """
        if depth is not None and depth < 1:
            raise ConfigurationError(f"per_module: depth must be >= 1 or None, got {depth}")
        names = trainable_names(model)
        members: dict[str, list[str]] = {}
        for n in names:
            parts = n.split(".")[:-1]
            if depth is not None:
                parts = parts[:depth]
            members.setdefault(".".join(parts) or _ROOT, []).append(n)
        return cls(members, names)

    @classmethod
    def by_pattern(
        cls,
        model: nn.Module,
        patterns: Mapping[str, str] | Sequence[tuple[str, str]],
        default: str | None = None,
    ) -> ParameterGroups:
        """Groups from regular expressions on parameter names.

        Args:
            model: the model.
            patterns: ``{regex: group name}`` (or a sequence of pairs). A parameter joins the
                group of every pattern that ``re.search``-matches its name; matching patterns of
                two different groups is an error. Several patterns may name the same group.
                Groups are ordered by first appearance in ``patterns``.
            default: group for parameters no pattern matches (placed last; dropped when it
                would be empty). Without it an unmatched parameter is an error.

        Raises:
            ConfigurationError: invalid regex, parameters matched by several groups or by none,
                or a pattern group that matched nothing.
        """
        pairs = list(patterns.items()) if isinstance(patterns, Mapping) else list(patterns)
        compiled = []
        for regex, group in pairs:
            try:
                compiled.append((re.compile(regex), str(group)))
            except re.error as err:
                raise ConfigurationError(f"by_pattern: invalid regex {regex!r}: {err}") from err
        names = trainable_names(model)
        members: dict[str, list[str]] = {g: [] for _, g in compiled}
        for n in names:
            hit = {g for rx, g in compiled if rx.search(n)}
            if not hit and default is not None:
                hit = {default}
            for g in sorted(hit):
                members.setdefault(g, []).append(n)
        if default is not None and default in members and not members[default]:
            if default not in {g for _, g in compiled}:
                del members[default]
        return cls(members, names)

    @classmethod
    def from_dict(cls, model: nn.Module, groups: Mapping[str, Sequence[str]]) -> ParameterGroups:
        """Groups given explicitly as ``{group name: [parameter names]}`` (in group order)."""
        names = trainable_names(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        listed = [n for ns in groups.values() for n in ([ns] if isinstance(ns, str) else ns)]
        frozen_listed = [n for n in listed if n in frozen]
        if frozen_listed:
            raise ConfigurationError(
                f"from_dict: frozen parameters (requires_grad=False) cannot be grouped: "
                f"{listing(frozen_listed)}; remove them from the mapping."
            )
        return cls(groups, names)

    @classmethod
    def resolve(
        cls, model: nn.Module, spec: ParameterGroups | str | Mapping[str, Sequence[str]]
    ) -> ParameterGroups:
        """Turn ``"tensor"``, ``"module"``, a ``{group: [names]}`` dict or groups into groups.

        A :class:`ParameterGroups` is checked against ``model``'s trainable parameters.
        """
        if isinstance(spec, ParameterGroups):
            names = trainable_names(model)
            if tuple(names) != spec.param_names:
                missing = [n for n in names if n not in spec.param_names]
                extra = [n for n in spec.param_names if n not in names]
                raise ConfigurationError(
                    "ParameterGroups were built for another set of trainable parameters: "
                    f"missing {listing(missing) or 'none'}; not in the model "
                    f"{listing(extra) or 'none'}. Rebuild the groups from this model."
                )
            return spec
        if spec == "tensor":
            return cls.per_tensor(model)
        if spec == "module":
            return cls.per_module(model)
        if isinstance(spec, Mapping):
            return cls.from_dict(model, spec)
        raise ConfigurationError(
            f"groups must be 'tensor', 'module', a {{group: [param names]}} dict or "
            f"ParameterGroups, got {spec!r}"
        )

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __repr__(self) -> str:
        return f"ParameterGroups({len(self)} groups: {listing(self.names, 8)})"

    def group_of(self, param_name: str) -> str:
        """Name of the group holding ``param_name``."""
        try:
            return self._group_of[param_name]
        except KeyError:
            raise ConfigurationError(f"{param_name!r} is not a grouped trainable parameter") from None

    def index_of(self, group: str) -> int:
        """Position of ``group`` in :attr:`names`."""
        try:
            return self.names.index(group)
        except ValueError:
            raise ConfigurationError(f"unknown group {group!r}; groups: {listing(self.names)}") from None

    def to_dict(self) -> dict[str, list[str]]:
        """``{group: [parameter names]}`` in group order (JSON-serializable)."""
        return {g: list(ns) for g, ns in self.members.items()}


def names_of(groups: ParameterGroups | Sequence[str]) -> tuple[str, ...]:
    """The group names of a :class:`ParameterGroups`, or the given names as a tuple."""
    return groups.names if isinstance(groups, ParameterGroups) else tuple(groups)


def check_unique_names(names: Sequence[str]) -> None:
    """Raise :class:`ConfigurationError` when a group name appears twice."""
    if len(set(names)) != len(names):
        raise ConfigurationError(f"duplicate group names: {tuple(names)}")


def check_same_names(target: Sequence[str], source: Sequence[str], tname: str, sname: str) -> None:
    """Check that ``target`` (no duplicates) and ``source`` hold the same group names.

    Args:
        target: the names values will be aligned to.
        source: the names they come with.
        tname: how to call ``target`` in the message.
        sname: how to call ``source`` in the message.

    Raises:
        ConfigurationError: ``target`` has duplicates, or the sets differ (both directions listed).
    """
    dups = sorted({n for n in target if list(target).count(n) > 1})
    if dups:
        raise ConfigurationError(f"{tname} lists duplicate group names: {listing(dups)}")
    missing = [n for n in target if n not in set(source)]
    extra = [n for n in source if n not in set(target)]
    if missing or extra:
        raise ConfigurationError(
            f"group names do not match: in {tname} but not in {sname}: "
            f"{listing(missing) or 'none'}; in {sname} but not in {tname}: "
            f"{listing(extra) or 'none'}. Fit or load weights for the same parameter groups."
        )


__all__ = ["ParameterGroups", "check_same_names", "check_unique_names", "listing", "names_of", "trainable_names"]
