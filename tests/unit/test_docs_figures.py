"""Benchmark figures are stated once, in bench/RESULTS.md (written by ``make bench``): a doc
that states a ratio (``4.9x``, or with the multiplication sign) or an "N times faster" states
one the results hold, and every results section a doc points to ("section "Probe cost" of
the results") exists.
Copies of figures in prose went stale: the README said 4.9x where the results said 3.15x."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "RESULTS.md"
DOCS = sorted(
    {
        ROOT / "README.md",
        ROOT / "bench" / "README.md",
        ROOT / "deploy" / "README.md",
        *ROOT.glob("docs/**/*.md"),
        *ROOT.glob("services/*/README.md"),
        *ROOT.glob("libs/*/README.md"),
    }
)
# 4.9x (or U+00D7, the multiplication sign), the high end of 0.8-1.5x; not 1920x1080 nor
# 0x1f, nor "4 \u00d7 resend_interval" with a space (a product, not a ratio).
SIGN = "\u00d7"
RATIO = re.compile(r"(?<![\w.,])(\d+(?:\.\d+)?)[x\u00d7](?![\w])")
TIMES = re.compile(r"\b\d+(?:\.\d+)?\s*(?:x|\u00d7|times)\s+(?:faster|slower|cheaper|quicker|as fast)\b", re.IGNORECASE)
SECTION = re.compile(r'\bsections? ((?:"[^"]+"(?:,? and |, )?)+)')


def stale_ratios(doc: str, results: str) -> list[str]:
    """The ratios ``doc`` states that ``results`` does not, and any "N times faster"."""
    held = {m.group(1) for m in RATIO.finditer(results)}
    return [m.group(0) for m in RATIO.finditer(doc) if m.group(1) not in held] + TIMES.findall(doc)


def missing_sections(doc: str, results: str) -> list[str]:
    """Sections a paragraph about the results names (``section "X"``) that no heading of
    ``results`` starts with."""
    headings = [line.removeprefix("### ") for line in results.splitlines() if line.startswith("### ")]
    missing = []
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        if "RESULTS.md" not in text and "the results" not in text:
            continue
        for names in SECTION.findall(text):
            missing += [n for n in re.findall(r'"([^"]+)"', names) if not any(h.startswith(n) for h in headings)]
    return missing


def test_the_checks_catch_the_stale_figure_the_issue_found() -> None:
    results = "| autoserve prober, keep_alive: true | 4,838 | 2.77x |\n\n### Probe cost: per CPU-second\n"
    doc = f'Result: 4.9{SIGN} blackbox_exporter (0.8-1.5x the relay), 2.77x in section "Probe cost" of the results.'
    assert stale_ratios(doc, results) == [f"4.9{SIGN}", "1.5x"]
    others = f"three times faster, 2 x faster, a 1920x1080 screen, 4 {SIGN} resend_interval, 0x1f"
    assert stale_ratios(others, results) == ["2 x faster"]
    assert missing_sections(doc, results) == []
    assert missing_sections('See the results, sections "Probe cost" and "Scale".', results) == ["Scale"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_doc_states_no_benchmark_ratio_the_results_do_not_hold(doc: Path) -> None:
    assert stale_ratios(doc.read_text(), RESULTS.read_text()) == [], (
        f"{doc.relative_to(ROOT)}: point to the section of bench/RESULTS.md instead of copying its figures"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_results_section_a_doc_points_to_exists(doc: Path) -> None:
    assert missing_sections(doc.read_text(), RESULTS.read_text()) == []
