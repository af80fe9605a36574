"""Where the shipped files live, relative to the source tree (no hard-coded machine paths)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "config"
DEFAULT_CONFIG = CONFIG_DIR / "node.yaml"
DEFAULT_RULES = CONFIG_DIR / "series_rules.yaml"
