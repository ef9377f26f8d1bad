"""Regenerate the README's configuration table from config/settings.py (run after adding a setting).

usage: .venv/bin/python scripts/update_readme_config.py
"""
from __future__ import annotations

from pathlib import Path

from config.settings import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| TOML key |"))
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    lines[start:end] = markdown_table().rstrip("\n").splitlines()
    README.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
