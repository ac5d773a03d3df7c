"""Benchmarks of the MeteoRA op and model against a single LoRA and PEFT, outside the core library.

Modules, one job each: :mod:`.config` (the settings, read from ``conf/benchmark/*.yaml`` with OmegaConf
dotlist overrides), :mod:`.timing` (medians: ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark``
on a CPU), :mod:`.layer` (one decoder layer's 7 projections per strategy), :mod:`.systems` (bare, PEFT
LoRA, PEFT Arrow and MeteoRA models with the same random weights), :mod:`.model` (whole-model
``generate`` and prefill), :mod:`.train` (one training step), :mod:`.targets` (the thresholds of the
config), :mod:`.report` (Markdown and flat metrics) and :mod:`.run` (all sections into one results
mapping). ``python -m benchmarks --help`` runs them without Hydra, DVC or MLflow (the GPU machine:
``benchmarks/gpu_benchmark.sh``); the DVC stage ``benchmark`` (``src/stages/benchmark.py``) runs the CPU profile.
"""
