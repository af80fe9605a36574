"""Where the files the project ships live: beside its packages, in a checkout and in an installed wheel alike.

The wheel installs ``config/`` (node.yaml, series_rules.yaml, examples) and ``models/`` (the bundled
checkpoints) as data folders next to ``dicom_node/`` in site-packages, exactly as they sit in the checkout, so
one rule finds them in both (no hard-coded machine paths, no checkout needed at run time).
"""

from pathlib import Path

#: the checkout, or site-packages for an installed wheel
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "config"
DEFAULT_CONFIG = CONFIG_DIR / "node.yaml"
DEFAULT_RULES = CONFIG_DIR / "series_rules.yaml"
