"""What the sharded path refuses when a tracker is built, each time naming what to use instead.

Kept apart from :mod:`~inrun_shapley.engine.sharding` (the DTensor work itself); the tracker calls
both through ``sharding``.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from inrun_shapley.errors import ConfigurationError

__all__ = ["USE_FSDP2", "check_sharded", "refuse_unsupported"]


def check_sharded(modules: Mapping, *, per_query: bool, order: int) -> None:
    """Refuse, at construction, what the sharded path does not compute.

    Raises:
        ConfigurationError: per-query values or second order (their validation passes are not
            sharded yet).
    """
    if per_query:
        raise ConfigurationError("per_query values are not available under FSDP (fully_shard): use "
                                 "per_query=False, or train with DDP for per-query values")
    if order != 1:
        raise ConfigurationError("order=2 is not available under FSDP (fully_shard): use order=1 (the default "
                                 "midpoint estimator needs no Hessian-vector product)")


USE_FSDP2 = ("use FSDP2 instead: torch.distributed.fsdp.fully_shard; Lightning "
             "Trainer(strategy=ModelParallelStrategy(...)) with fully_shard in configure_model; Accelerate "
             "FullyShardedDataParallelPlugin(fsdp_version=2); the Hugging Face Trainer's "
             "fsdp_config={'fsdp_version': 2} (README, 'Sharded training')")


def _wrapper_chain(optimizer) -> list:
    """The optimizer and every object it wraps through ``.optimizer`` (framework wrappers, ZeRO)."""
    chain = [optimizer]
    for _ in range(8):
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is o for o in chain):
            break
        chain.append(inner)
    return chain


def refuse_unsupported(model: nn.Module, optimizer) -> None:
    """Refuse, at construction, sharding schemes whose parameters the tracker cannot read.

    Raises:
        ConfigurationError: a DeepSpeed engine or ZeRO optimizer (parameters and optimizer
            state are flattened and partitioned outside torch's view), or FSDP1
            (``FullyShardedDataParallel``: parameters flattened into one ``FlatParameter`` per
            unit); each message names what to use instead.
    """
    owners = [type(o) for o in _wrapper_chain(optimizer)] + [type(m) for m in model.modules()]
    if any(t.__module__.split(".")[0] == "deepspeed" for t in owners):
        raise ConfigurationError(
            "DeepSpeed (ZeRO) is not supported: it flattens and partitions the parameters, gradients and "
            "optimizer state outside torch's optimizer, so per-sample values cannot be read from them; "
            "ZeRO-3 corresponds to FSDP2's fully_shard, ZeRO-1/2 to fully_shard(reshard_after_forward=False): "
            + USE_FSDP2 + ", or plain DDP"
        )
    params = [p for o in _wrapper_chain(optimizer) for g in getattr(o, "param_groups", ()) for p in g["params"]]
    flat = any(getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter" for p in params)
    if flat or any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ConfigurationError(
            "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel, Lightning strategy='fsdp', Accelerate "
            "fsdp_version=1) is not supported: it flattens each unit's parameters into one FlatParameter, so "
            "the layers' own parameters and optimizer state are not visible; " + USE_FSDP2
        )
