"""The README's measured numbers are written from the committed results (scripts/readme_results.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_the_data():
    script = _script()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [match["name"] for match in script.BLOCK.finditer(text)]
    assert sorted(names) == sorted(script.GENERATORS), names
    assert script.render(text) == text, "run python scripts/readme_results.py"


def test_a_changed_number_is_caught():
    script = _script()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tampered = text.replace("| 512 | ", "| 512 | 9", 1)
    assert tampered != text
    assert script.render(tampered) != tampered
