"""``python -m fused_preact.train --help``"""
import sys

from .data import DatasetError
from .cli import main
from .loop import NonFiniteLoss

try:
    metrics = main()
except (DatasetError, NonFiniteLoss) as error:
    sys.exit(f"error: {error}")
sys.exit(metrics.get("exit_code", 0) if isinstance(metrics, dict) else 0)
