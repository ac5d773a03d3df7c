"""Gate training at paper scale on 1..N GPUs under FSDP2: tokens per second, peak memory per GPU and
scaling efficiency, for LLaMA3-8B and LLaMA2-13B shapes (random weights built from a config) with 28
random rank-8 adapters on all 7 projections, bf16, activation checkpointing, top-2 gates.

One command (needs only torch, transformers, triton; no Hydra, DVC or MLflow):

    PYTHONPATH=src python3 scripts/gpu_fsdp_benchmark.py --out $OUT/fsdp_benchmark.json

It runs, for every model and every world size up to the visible GPUs (1, 2, 4, 8), one torchrun job of
this same file (`--worker`), each on a time limit; the JSON is rewritten after every job, so what ran
survives a cut-off. Out of memory, a time-out or a crash is recorded for that job and the next one
runs. Scaling efficiency at W GPUs = tokens/s(W) / (W x tokens/s(1 GPU)). `--models tiny --device cpu`
is a CPU smoke test (gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

SHAPES = {
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama2_13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}
# NVLink multicast stays off wherever this starts a process (shared GPUs; see the device notes).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- one job: every rank builds the model, FSDP shards it, the gates train for a few steps ------------------

def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meteora import attach_meteora, random_adapter_bank
    from stages.distributed import destroy_distributed, gather_objects, init_distributed, is_main_process, wrap_for_training
    from stages.objectives import GateObjective
    from stages.trainer import Encoded, LoopSettings, Trainer

    info = init_distributed("nccl" if args.device == "cuda" else "gloo", force=True)
    cuda = info.device.type == "cuda"
    result: dict = {"model": args.model, "engine": args.engine, "world_size": info.world_size, "status": "error"}

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    phase = "build"
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[args.model], tie_word_embeddings=False)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(info.device):
            lm = LlamaForCausalLM(config)
        torch.set_default_dtype(previous)
        bank = random_adapter_bank(lm, args.adapters, rank=args.rank, alpha=2.0 * args.rank,
                                   generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
        model = attach_meteora(lm, bank, top_k=args.top_k, strategy=args.strategy)
        del bank
        phase = "shard"
        module = wrap_for_training(model, args.engine, "bf16", activation_checkpointing=True, device=info.device)
        if is_main_process():
            log(f"  {args.model} x{info.world_size}: built and sharded in {time.perf_counter() - started:.1f} s")
        # The stages' own loop: every step a global batch of world x accumulation x micro_batch random
        # sequences (LM loss on every token), split over the ranks and into micro-batches by the trainer.
        steps, rows = args.warmup + args.steps, info.world_size * args.accumulation * args.micro_batch
        generator = torch.Generator().manual_seed(100)
        examples = [Encoded(ids, ids) for ids in
                    torch.randint(config.vocab_size, (steps * rows, args.seq_len), generator=generator).tolist()]
        task_ids = torch.randint(args.adapters, (steps * rows,), generator=generator).tolist()
        trainer = Trainer(
            GateObjective(model, task_ids, args.lambda_gate, forward_module=module), examples,
            [list(range(s * rows, (s + 1) * rows)) for s in range(steps)],
            LoopSettings(steps=steps, lr=5e-4, weight_decay=0.01, max_grad_norm=0.3, schedule="constant",
                         gradient_accumulation=args.accumulation),
            pad_id=0, desc=f"fsdp {args.model}",
        )
        model.train()
        model.keep_routing(True)
        result["init_peak_memory_gib"] = peak_gib()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_times = []
        for step in range(steps):
            phase = f"step {step + 1}"
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            metrics = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                step_times.append(elapsed)
            if is_main_process():
                log(f"  {args.model} x{info.world_size}: step {step + 1}/{steps} {elapsed:.2f} s "
                    f"loss {metrics['loss']:.3f}{'' if step >= args.warmup else ' (warm-up)'}")
        tokens_per_step = info.world_size * args.accumulation * args.micro_batch * args.seq_len
        mean_step = sum(step_times) / len(step_times)
        result.update(
            status="ok", tokens_per_step=tokens_per_step, step_time_s=round(mean_step, 4),
            step_times_s=[round(t, 4) for t in step_times], tokens_per_s=round(tokens_per_step / mean_step, 1),
            tokens_per_s_per_gpu=round(tokens_per_step / mean_step / info.world_size, 1),
        )
        phase = "report"
    except torch.OutOfMemoryError as err:
        result.update(status="oom", phase=phase, error=str(err).splitlines()[0][:300])
        log(f"rank {info.rank}: out of memory during {phase}")
    peaks = gather_objects([peak_gib()]) if result["status"] == "ok" else [peak_gib()]
    if cuda:
        result["peak_memory_gib_per_gpu"] = peaks
        result["peak_memory_gib_max"] = max(p for p in peaks if p is not None)
        result["gpu_memory_gib"] = round(torch.cuda.get_device_properties(info.device).total_memory / 2**30, 1)
    if is_main_process() or result["status"] != "ok":
        Path(args.result).write_text(json.dumps(result))
    if result["status"] == "ok":
        destroy_distributed()
    else:
        os._exit(3)  # a rank out of memory cannot finish the collectives; the others are stopped by the driver


# --- the driver: one torchrun job per (model, world size), results gathered into one JSON --------------------

def environment(device: str) -> dict:
    import torch
    import transformers

    env: dict = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
    return env


def run_job(args: argparse.Namespace, model: str, world: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
            "--worker", "--model", model, "--result", str(result_path), "--device", args.device,
            "--engine", args.engine, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
            "--accumulation", str(args.accumulation), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--adapters", str(args.adapters), "--rank", str(args.rank), "--top-k", str(args.top_k),
            "--strategy", args.strategy, "--lambda-gate", str(args.lambda_gate),
        ]
        env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        tail: list[str] = []

        def relay() -> None:
            for line in process.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line.rstrip())
                del tail[:-30]

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            reader.join(timeout=5)
            return {"model": model, "world_size": world, "status": "timeout", "timeout_s": round(timeout),
                    "output_tail": tail[-10:]}
        reader.join(timeout=5)
        wall = round(time.perf_counter() - started, 1)
        if result_path.is_file():
            return {**json.loads(result_path.read_text()), "job_wall_s": wall}
        return {"model": model, "world_size": world, "status": "error", "returncode": process.returncode,
                "job_wall_s": wall, "output_tail": tail[-15:]}


def scaling(runs: list[dict]) -> dict:
    """Per model: tokens/s of each world size and its efficiency against W x (1 GPU)."""
    out: dict = {}
    for run in runs:
        if run.get("status") != "ok":
            continue
        out.setdefault(run["model"], {})[str(run["world_size"])] = {"tokens_per_s": run["tokens_per_s"]}
    for per_world in out.values():
        base = per_world.get("1", {}).get("tokens_per_s")
        for world, entry in per_world.items():
            entry["efficiency"] = round(entry["tokens_per_s"] / (int(world) * base), 3) if base else None
    return out


def driver(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible (use --device cpu --models tiny for the CPU smoke test)")
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    worlds = [w for w in args.worlds if w <= available]
    report = {
        "benchmark": "MeteoRA gate training under FSDP2 (fully_shard per decoder layer, frozen base and adapters sharded)",
        "environment": environment(args.device),
        "settings": {
            "engine": args.engine, "mixed_precision": "bf16", "activation_checkpointing": True,
            "adapters": args.adapters, "lora_rank": args.rank, "top_k": args.top_k, "strategy": args.strategy,
            "seq_len": args.seq_len, "micro_batch_per_gpu": args.micro_batch, "gradient_accumulation": args.accumulation,
            "warmup_steps": args.warmup, "measured_steps": args.steps, "lambda_gate": args.lambda_gate,
            "optimizer": "AdamW over the gates (sharded with them)",
        },
        "shapes": {m: SHAPES[m] for m in args.models},
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    log(f"{report['environment']}; worlds {worlds}; models {args.models}; budget {args.budget_s} s")
    for model in args.models:
        for world in worlds:
            left = deadline - time.perf_counter()
            if left < 60:
                report["runs"].append({"model": model, "world_size": world, "status": "skipped", "reason": "time budget"})
                log(f"{model} x{world}: skipped (time budget)")
                continue
            log(f"{model} on {world} {'GPU' if args.device == 'cuda' else 'process'}(es): start")
            run = run_job(args, model, world, min(args.job_timeout_s, left))
            report["runs"].append(run)
            report["scaling"] = scaling(report["runs"])
            out.write_text(json.dumps(report, indent=2) + "\n")
            summary = {k: run.get(k) for k in ("status", "tokens_per_s", "peak_memory_gib_max", "job_wall_s")}
            log(f"{model} x{world}: {summary}")
    report["scaling"] = scaling(report["runs"])
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}: {json.dumps(report['scaling'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "reports/benchmark"), "fsdp_benchmark.json"))
    parser.add_argument("--models", type=lambda s: s.split(","), default=["llama3_8b", "llama2_13b"],
                        help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--worlds", type=lambda s: [int(w) for w in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--engine", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (Triton autotuning, allocator)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--adapters", type=int, default=28)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--lambda-gate", type=float, default=50.0)
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting jobs past this (device calls last <= 600 s)")
    parser.add_argument("--job-timeout-s", type=float, default=300.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set([args.model] if args.worker else args.models) - set(SHAPES))
    if unknown:
        parser.error(f"unknown model shapes {unknown}; known: {sorted(SHAPES)}")
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
