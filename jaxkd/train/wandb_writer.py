"""Optional Weights & Biases writer for jaxkd runs (``train.wandb=True``).

Alongside ``metrics.jsonl`` and TensorBoard, each epoch's record goes to a wandb run: the config
(``run.cfg_dict``) as the run config, every numeric metric of the record, and at the end the run's
summary (``summary.json``) as the wandb summary. ``train.wandb_project`` (default ``"jaxkd"``) and
``train.wandb_name`` (default: wandb's) name the run; wandb's own settings (``WANDB_MODE=offline``,
``WANDB_ENTITY``, ``WANDB_API_KEY``, ...) come from the environment. The wandb files go to
``WORKDIR/wandb``.

Resuming: the wandb run id is stored in ``WORKDIR/wandb_run_id`` on first use, and a resumed run
(``jaxkd train`` again in the same work dir) continues that wandb run (``resume="allow"``).

Steps: every metric is plotted against jaxkd's global step, logged as the metric ``step``
(``define_metric("*", step_metric="step")``), not wandb's internal ``_step``, which must only grow.
When a resume falls back to an older checkpoint (the newest was damaged, or the process died after
logging epochs it had not checkpointed), the epochs after that checkpoint are trained and logged
again with the same ``step`` values: nothing is dropped, the wandb history holds both rows (with
increasing ``_step``), and a chart against ``step`` shows two points at those steps (the line goes
back and runs over the stretch again). ``metrics.jsonl`` instead drops the records after the
checkpoint before they are redone, so it holds each step once.

Only process 0 writes. ``wandb`` is an optional dependency (``pip install 'jaxkd[wandb]'``).
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any

from jaxkd.errors import ConfigError

RUN_ID_FILE = "wandb_run_id"

__all__ = ["RUN_ID_FILE", "WandbWriter", "from_config"]


class WandbWriter:
    """One wandb run for one jaxkd work dir (see the module docstring)."""

    def __init__(self, workdir: str, config: dict, project: str | None = None, name: str | None = None):
        try:
            import wandb  # noqa: F401  (checked here, used when the run starts)
        except ImportError:
            raise ConfigError("config.train.wandb=True needs the wandb package: pip install 'jaxkd[wandb]' "
                              "(or pip install wandb)") from None
        os.makedirs(workdir, exist_ok=True)
        id_path = os.path.join(workdir, RUN_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb run ids: short lowercase alphanumeric strings
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self.run_id = run_id
        self._init = dict(project=project or "jaxkd", name=name, id=run_id, resume="allow", config=config,
                          dir=workdir)
        self.run = None  # started on the first record or summary (a finished run started again logs nothing)

    def _start(self):
        if self.run is None:
            import wandb

            self.run = wandb.init(**self._init)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        return self.run

    def write(self, record: dict) -> None:
        """Logs an epoch record's numbers at ``step=record["step"]``."""
        values = {k: v for k, v in record.items() if _is_number(v)}
        values["step"] = int(record["step"])
        self._start().log(values)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Writes ``summary`` into the wandb run's summary (numbers and strings) and ends the run."""
        if summary:
            self._start().summary.update({k: v for k, v in summary.items() if _is_number(v) or isinstance(v, str)})
        if self.run is not None:
            self.run.finish()
            self.run = None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def from_config(train_cfg, workdir: str, cfg_dict: dict) -> WandbWriter | None:
    """The writer ``config.train`` asks for (``train.wandb``), on process 0; else ``None``."""
    import jax

    if not train_cfg.get("wandb") or jax.process_index() != 0:
        return None
    return WandbWriter(workdir, cfg_dict, train_cfg.get("wandb_project"), train_cfg.get("wandb_name"))
