"""``python -m fused_preact.experiments --help``"""
import sys

from .cli import main

sys.exit(main())
