"""Prompts and training data for distillation."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "static_prompts.txt"


def read_prompts(path: str | Path = DEFAULT_PROMPTS_PATH) -> list[str]:
    """Read a UTF-8 prompts file: one prompt per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist: pass data_path=<a UTF-8 text file, one prompt per line>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not valid UTF-8 (byte {err.start}): re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one prompt per line (lines starting with # are comments)")
    return prompts
