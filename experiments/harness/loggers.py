"""Optional experiment loggers. ``logger=none`` (default) or ``logger=wandb``.

wandb runs offline unless the user has set ``WANDB_MODE``/``logger.mode`` otherwise, and
never prompts for a login. Runs are grouped by experiment; the wandb run id is the
harness's run id, so a requeued Slurm job resumes the same wandb run. wandb's files go into
the run's own output folder, never into the working directory that all runs share.
"""

from __future__ import annotations

import os


class NullLogger:
    def log(self, metrics: dict, step: int | None = None):
        pass

    def finish(self, summary: dict | None = None, failed: bool = False):
        pass


class WandbLogger:
    def __init__(self, cfg, run_id: str, config: dict, group: str | None, folder=None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        mode = os.environ.get("WANDB_MODE") or cfg.get("mode") or "offline"
        self.run = wandb.init(
            project=cfg.get("project"),
            entity=cfg.get("entity"),
            group=cfg.get("group") or group,
            id=run_id,
            name=run_id,
            resume="allow",
            config=config,
            mode=mode,
            dir=str(folder) if folder is not None else None,
            settings=wandb.Settings(silent=True, login_timeout=0),
        )

    def log(self, metrics: dict, step: int | None = None):
        self.run.log(metrics, step=step)

    def finish(self, summary: dict | None = None, failed: bool = False):
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=1 if failed else 0)


def make_logger(cfg, run_id: str, config: dict, group: str | None = None, folder=None):
    name = cfg.get("name", "none")
    if name == "none":
        return NullLogger()
    if name == "wandb":
        return WandbLogger(cfg, run_id, config, group, folder)
    from core.errors import ConfigError

    raise ConfigError(f"logger={name!r} is not one of none, wandb")
