"""mailer: a newsletter and subscriber mailer for news sites."""

from pathlib import Path

__version__ = "0.1.0"

# Templates and migrations live beside the package in the repository (see README, "Layout").
ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
MIGRATIONS_DIR = ROOT / "migrations"
