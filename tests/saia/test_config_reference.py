import re
from pathlib import Path

from saia.config_reference import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_documents_every_agent_key() -> None:
    text = render()
    for key in ("state_dir", "services[]", "resources", "time_limit", "renewal_lead", "router"):
        assert key in text


def test_committed_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run `python -m saia.config_reference > "
        "docs/configuration.md`"
    )


def test_every_key_has_a_meaning() -> None:
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 4 and cells[3].strip(), f"no meaning (one line) in: {row}"
