"""Hydra imports this module when it scans for plugins: it registers the pipeline's config schema, so that
compositions made outside the stages (DVC's, for `dvc exp run -S ...`) validate against it too."""

from stages.config import register

register()
