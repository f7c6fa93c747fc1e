"""The README's measured numbers are written from the committed results (scripts/readme_results.py)."""

from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script(ROOT / "scripts" / "readme_results.py")


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
