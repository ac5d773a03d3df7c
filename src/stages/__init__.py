"""DVC stages of the MeteoRA pipeline: one Hydra-configured script per stage (`python -m stages.<name>`)."""
