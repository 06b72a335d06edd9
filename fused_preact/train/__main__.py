"""``python -m fused_preact.train --help``"""
import sys

from .data import DatasetError
from .cli import main
from .errors import TrainerError

try:
    metrics = main()
except DatasetError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
except TrainerError as error:    # its exit status says which kind (errors.py, --help)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_status)
except OSError as error:         # a file of the run that could not be written (it names the file)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
sys.exit(metrics.get("exit_code", 0) if isinstance(metrics, dict) else 0)
