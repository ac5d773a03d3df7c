"""Several processes, one stage: process groups from torchrun's environment, PyTorch's own DDP and FSDP
(FSDP2, ``torch.distributed.fsdp.fully_shard``) around a :class:`~meteora.model.MeteoRAModel`, full
(unsharded) gate and optimizer states for checkpoints that resume on any number of processes, and
the sharding and gathering of evaluation examples.

Only the gates train. Under FSDP every decoder layer is one shard group holding its frozen base
weights, its frozen adapters and its gates, so the frozen model, the gates, their gradients and
their optimizer state are all split over the ranks. Every function here also works without a
process group (one process): it then does nothing more than the single-device code would.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meteora.checkpoint import save_gate_state
from meteora.model import MeteoRAModel

ENGINES = ("single", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size``, its rank on the node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


# --- process group ------------------------------------------------------------------------------

def resolve_backend(backend: str = "auto") -> str:
    """``"auto"``: NCCL when CUDA is available, else Gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"trainer.backend={backend!r}: expected auto, nccl or gloo")
    return backend


def init_distributed(backend: str = "auto", force: bool = False, timeout_min: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without torchrun's environment no group is made, unless ``force`` (DDP or FSDP asked for on one
    device): then a one-process group on an in-memory store. Sets the CUDA device to the local rank.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend)
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("trainer.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        device_id = device if backend == "nccl" else None
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        elif force:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id)
    return DistInfo(rank(), world_size(), local_rank, device)


def destroy_distributed() -> None:
    """Leave the process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and when there is no process group (logging, writing files)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """The device collectives take tensors on: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- sharding examples, gathering results ----------------------------------------------------------

def shard_indices(n: int, rank: int, world: int) -> range:
    """This rank's items of ``range(n)``: every ``world``-th from ``rank`` on (shares differ by at most
    one item, and neighbouring items, often alike in length or task, go to different ranks)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return range(rank, n, world)


def gather_objects(items: Sequence[Any]) -> list[Any]:
    """Every rank's ``items`` (picklable) concatenated in rank order, returned on all ranks."""
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def map_sharded(fn: Callable[[list[Any]], Sequence[Any]], items: Sequence[Any]) -> list[Any]:
    """``fn(items)`` computed in shards: every rank applies ``fn`` (one output per item, no collectives
    inside) to its :func:`shard_indices` share; the outputs come back on all ranks in ``items`` order."""
    share = shard_indices(len(items), rank(), world_size())
    outputs = list(fn([items[i] for i in share])) if len(share) else []
    if len(outputs) != len(share):
        raise ValueError(f"map_sharded: fn returned {len(outputs)} outputs for {len(share)} items")
    pairs = sorted(gather_objects(list(zip(share, outputs))), key=lambda pair: pair[0])
    return [output for _, output in pairs]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64)."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


# --- wrapping for training ------------------------------------------------------------------------

def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _decoder_layers(model: MeteoRAModel) -> list[nn.Module]:
    """The LM's repeated blocks (the classes in its ``_no_split_modules``, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model.model, "_no_split_modules", None) or [])
    layers = [m for m in model.model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model.model).__name__} declares no decoder layer classes "
                         f"(_no_split_modules={sorted(names)}); FSDP cannot group it per layer")
    return layers


def _broadcast_gates(model: MeteoRAModel) -> None:
    """Make every rank start from rank 0's gates (they are initialised from each rank's own RNG)."""
    if world_size() == 1:
        return
    device = _comm_device()
    with torch.no_grad():
        for param in model.gate_parameters():
            buffer = param.detach().to(device)
            dist.broadcast(buffer, src=0)
            param.copy_(buffer.to(param.device))


def cast_parameters(model: nn.Module, frozen_dtype: torch.dtype) -> None:
    """Store every frozen parameter (base weights, adapters) in ``frozen_dtype`` and every trainable one
    (the gates) in float32, their master copy; buffers (LoRA scalings, rotary frequencies) stay as they are."""
    for param in model.parameters():
        if param.is_floating_point():
            dtype = torch.float32 if param.requires_grad else frozen_dtype
            if param.dtype != dtype:
                param.data = param.data.to(dtype)


def enable_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a Hugging Face LM (the name
    changed in transformers 5: ``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``)."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_for_training(
    model: MeteoRAModel,
    engine: str = "single",
    mixed_precision: str = "fp32",
    activation_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Prepare ``model`` (gates trainable, the rest frozen) for gate training on this rank.

    engine: ``"single"`` (moved to ``device``), ``"ddp"`` (DistributedDataParallel: a replica per rank,
    gate gradients all-reduced) or ``"fsdp"`` (FSDP2: every decoder layer one shard group, then the
    root; base, adapters, gates, gradients and optimizer state are sharded). DDP and FSDP need a
    process group (:func:`init_distributed`).
    mixed_precision: ``"bf16"`` stores the frozen weights in bfloat16 and computes in bfloat16, the
    gates keep a float32 master copy (FSDP reduces their gradients in float32); ``"fp32"``: all float32.
    activation_checkpointing: recompute every decoder layer in backward (the LM's non-reentrant
    gradient checkpointing).

    Returns the module to call forward on: ``model`` itself (single, FSDP: sharded in place) or its
    DDP wrapper. Create the optimizer over ``model.gate_parameters()`` after this call.
    """
    if engine not in ENGINES:
        raise ValueError(f"trainer.engine={engine!r}: expected one of {ENGINES}")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"trainer.mixed_precision={mixed_precision!r}: expected one of {PRECISIONS}")
    if engine != "single" and not dist.is_initialized():
        raise RuntimeError(
            f"trainer.engine={engine!r} needs a process group: launch through `python -m stages.launch` "
            "(torchrun) or call stages.distributed.init_distributed(force=True) first"
        )
    if not model.gate_parameters():
        raise ValueError("the model has no gates to train")
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    )
    cast_parameters(model, torch.bfloat16 if mixed_precision == "bf16" else torch.float32)
    if activation_checkpointing:
        enable_checkpointing(model.model)
    _broadcast_gates(model)
    if engine == "single":
        return model.to(device)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    )
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Context for one micro-batch's backward: with ``enabled=False`` gradients only accumulate
    locally (DDP's no_sync, FSDP's requires_gradient_sync); the last micro-batch syncs."""
    if enabled:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (gathered), or ``t`` itself. Collective for DTensors."""
    return t.full_tensor() if _is_dtensor(t) else t


# --- full (unsharded) states: checkpoints that resume on any number of ranks -----------------------------

def full_gate_state(model: MeteoRAModel) -> dict[str, torch.Tensor]:
    """Module name -> full gate weight (N, d_in) on the CPU, on every rank. Collective under FSDP."""
    return {
        name: local_value(layer.gate.weight.detach()).cpu().clone()
        for name, layer in model.meteora_layers().items()
    }


def load_full_gate_state(model: MeteoRAModel, state: dict[str, torch.Tensor]) -> None:
    """Copy full gate weights into the model, re-sharding them where it is sharded."""
    from torch.distributed.tensor import distribute_tensor

    layers = model.meteora_layers()
    missing = sorted(set(layers) - set(state))
    if missing:
        raise KeyError(f"gate state lacks modules {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.gate.weight
            full = state[name].to(dtype=weight.dtype)
            if _is_dtensor(weight):
                full = distribute_tensor(full.to(weight.device_mesh.device_type), weight.device_mesh, weight.placements)
                weight.to_local().copy_(full.to_local())
            else:
                weight.copy_(full.to(weight.device))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered and moved to the CPU: the
    same dict whatever the number of ranks. Collective under FSDP (every rank must call it)."""
    state = optimizer.state_dict()
    return {
        "state": {
            index: {key: (local_value(v).cpu().clone() if isinstance(v, torch.Tensor) else v) for key, v in entry.items()}
            for index, entry in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state` (saved with any number of ranks), re-sharding every state
    tensor like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    local: dict[int, dict] = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        converted = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and _is_dtensor(param) and value.shape == param.shape:
                value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
            converted[key] = value
        local[int(index)] = converted
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def save_gates(model: MeteoRAModel, directory: str | os.PathLike) -> None:
    """:meth:`MeteoRAModel.save_gates` for a model on any engine: gathers, then rank 0 writes."""
    state = full_gate_state(model)
    if is_main_process():
        save_gate_state(directory, state, model.adapter_names, model.base_model_name, model.top_k, model.temperature)
    barrier()
