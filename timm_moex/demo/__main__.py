"""``python -m timm_moex.demo``."""
import sys

from .cli import main

sys.exit(main())
