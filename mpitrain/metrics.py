"""Per-epoch metrics as JSON lines (rank 0 writes)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path | None):
        self.path = path
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
