"""Launcher of the stages that can use several devices (train_gates, evaluate).

`python -m stages.launch <stage> [--params params.yaml] [overrides ...]` reads `cfg.trainer`: with
`trainer.devices x trainer.nodes > 1` it re-executes the stage under `torchrun`
(`python -m torch.distributed.run --nproc_per_node <devices> ... -m stages.<stage> <same arguments>`),
otherwise it runs the stage in this process. DVC's stage commands call it, so
`dvc exp run -S trainer=fsdp -S trainer.devices=4` trains the gates on 4 GPUs with no other change.

On several nodes run the same command on every node with its own `trainer.node_rank` and the
address of node 0 in `trainer.master_addr` (the workspace must be on a shared file system).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from omegaconf import DictConfig, OmegaConf

from stages.common import ConfigError, load_config
from stages.distributed import ENGINES, PRECISIONS, DistInfo, init_distributed

STAGES = ("train_gates", "evaluate")


@dataclass(frozen=True)
class TrainerSettings:
    """`conf/trainer/*.yaml`: the engine and where it runs (keys missing from a profile take these defaults)."""

    engine: str = "single"               # single | ddp | fsdp
    devices: int = 1                     # processes (GPUs) per node
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"       # node 0's address (several nodes)
    master_port: int = 29500
    backend: str = "auto"                # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    mixed_precision: str = "fp32"        # fp32 | bf16 (frozen weights and compute in bf16, gates fp32)
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1       # micro-batches per step on every rank (gate.batch_size is global)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainerSettings:
        trainer = OmegaConf.select(cfg, "trainer", default=None)
        values = OmegaConf.to_container(trainer, resolve=True) if trainer is not None else {}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"conf/trainer: unknown keys {unknown}; known: {[f.name for f in fields(cls)]}")
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"trainer.engine={self.engine!r}: expected one of {ENGINES}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"trainer.mixed_precision={self.mixed_precision!r}: expected one of {PRECISIONS}")
        if self.devices < 1 or self.nodes < 1 or not 0 <= self.node_rank < self.nodes:
            raise ConfigError(f"trainer: devices={self.devices}, nodes={self.nodes}, node_rank={self.node_rank} is not a valid layout")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"trainer.gradient_accumulation={self.gradient_accumulation} must be >= 1")
        if self.engine == "single" and self.world_size > 1:
            raise ConfigError(
                f"trainer.engine=single runs one process but devices x nodes = {self.world_size}: "
                "choose trainer=ddp or trainer=fsdp"
            )


def torchrun_argv(stage: str, stage_args: Sequence[str], settings: TrainerSettings) -> list[str]:
    """The command that runs `stages.<stage>` on `settings.devices` processes per node under torchrun."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={settings.devices}", f"--nnodes={settings.nodes}"]
    if settings.nodes == 1:
        argv.append("--standalone")
    else:
        argv += [f"--node_rank={settings.node_rank}", f"--master_addr={settings.master_addr}", f"--master_port={settings.master_port}"]
    return argv + ["-m", f"stages.{stage}", *stage_args]


def setup_distributed(cfg: DictConfig) -> tuple[TrainerSettings, DistInfo]:
    """Called by a stage first thing: checks that it was started with as many processes as
    `cfg.trainer` asks for and joins their process group (DDP and FSDP on one device get a
    one-process group)."""
    settings = TrainerSettings.from_config(cfg)
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != settings.world_size:
        how = "python -m stages.launch <stage> ..." if launched == 1 else "a matching trainer.devices/trainer.nodes"
        raise ConfigError(
            f"trainer asks for {settings.world_size} processes (devices={settings.devices} x nodes={settings.nodes}) "
            f"but this run has {launched}: use {how}"
        )
    return settings, init_distributed(settings.backend, force=settings.engine != "single")


def trainer_summary(settings: TrainerSettings, info: DistInfo) -> dict:
    """What the reports record about the engine."""
    return {**asdict(settings), "world_size": info.world_size}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        sys.stderr.write(f"usage: python -m stages.launch {{{','.join(STAGES)}}} [--params params.yaml] [overrides ...]\n")
        return 2
    stage, stage_args = argv[0], argv[1:]
    settings = TrainerSettings.from_config(load_config(stage_args))
    if settings.world_size > 1 and "WORLD_SIZE" not in os.environ:
        command = torchrun_argv(stage, stage_args, settings)
        print(f"launch: {' '.join(command)}", flush=True)
        sys.stderr.flush()
        os.execv(command[0], command)
    importlib.import_module(f"stages.{stage}").main(stage_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
