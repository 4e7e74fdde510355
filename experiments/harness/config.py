"""The harness's Hydra config (conf/), composed outside a run: for tests, benchmarks and notebooks."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[2] / "conf"  # experiments/harness/config.py -> <repo>/conf


def compose_config(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, as ``python -m experiments.run`` would resolve them;
    ``hydra_node``: with the ``hydra`` node a job sees (sweeper params, launcher)."""
    from hydra import compose, initialize_config_dir

    from methods.compose import register_method_name_resolver

    register_method_name_resolver()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_node)
