"""Training metrics of a run: one JSON record per line in ``<run>/metrics.jsonl`` and, where TensorBoard is
installed and asked for, scalars under ``<run>/tensorboard/``. Only the logging rank writes."""

from __future__ import annotations

import json
import os


class MetricsLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("TensorBoard not installed (pip install tensorboard); metrics go to metrics.jsonl only")

    def log(self, record: dict) -> None:
        """Append ``record`` (it has an ``iteration``); its numbers also become TensorBoard scalars."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.writer.add_scalar(k, v, record["iteration"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
