"""The studies' method: the verdict rule, the report generator, and every doc equal to what its results give."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vitkit.cli import main as cli_main
from vitkit.errors import ConfigError
from vitkit.tools import report
from vitkit.tools.verdict import contrast_interval, decide, t_quantile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (30, 2.0423), (1e9, 1.9600)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_welch_interval_by_hand():
    a, b = [86.1, 86.4, 86.0], [81.3, 82.1]
    iv = contrast_interval({"a": a, "b": b}, {"a": 1, "b": -1})
    va, vb = 0.04333333 / 3, 0.32 / 2  # sample variances / n
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    assert iv.estimate == pytest.approx(86.1666667 - 81.7)
    assert (iv.low, iv.high) == pytest.approx((iv.estimate - half, iv.estimate + half), rel=1e-6)
    assert iv.seeds == 2
    assert contrast_interval({"a": [1.0], "b": [2.0, 3.0]}, {"a": 1, "b": -1}) is None
    with pytest.raises(KeyError, match="not among the groups"):
        contrast_interval({"a": [1.0, 2.0]}, {"a": 1, "c": -1})


def test_decide_every_outcome():
    from vitkit.tools.verdict import Interval

    above, below, around = Interval(1, 0.5, 1.5, 3, 2), Interval(-1, -1.5, -0.5, 3, 2), Interval(0, -0.5, 0.8, 3, 2)
    assert decide(above, "above") == "holds" and decide(below, "above") == "fails"
    assert decide(around, "above") == "cannot tell at 2 seeds"
    assert decide(below, "below") == "holds" and decide(above, "below") == "fails"
    assert decide(around, "within", 1.0) == "holds"
    assert decide(Interval(3, 2, 4, 3, 2), "within", 1.0) == "fails"
    assert decide(above, "within", 1.0) == "cannot tell at 2 seeds"  # 1.5 is outside, 0.5 inside
    assert decide(None, "above", seeds=1) == "cannot tell at 1 seed"
    with pytest.raises(ValueError, match="margin"):
        decide(around, "within")


def _doc(tmp_path: Path, body: str) -> Path:
    (tmp_path / "pyproject.toml").write_text("")
    doc = tmp_path / "docs" / "study.md"
    doc.parent.mkdir()
    rows = [{"name": n, "seed": s, "m": {"acc": v}} for n, s, v in
            [("a", 0, 0.81), ("a", 1, 0.83), ("b", 0, 0.71), ("b", 1, 0.74)]]
    (doc.parent / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc.write_text(body)
    return doc


def test_blocks_are_rebuilt_from_results_and_check_fails_on_drift(tmp_path, capsys):
    doc = _doc(tmp_path, "# A study\n\nProse stays.\n\n"
               '<!-- report: table results=results.jsonl group=name columns="m.acc*100:acc (%):.2f" -->\n'
               "| stale | table |\n<!-- /report -->\n\nMore prose.\n\n"
               "<!-- report: verdict results=results.jsonl group=name value=m.acc*100 contrast=a:1,b:-1 "
               'expect=above says="a beats b" -->\n<!-- /report -->\n')
    assert cli_main(["report", str(doc), "--check"]) == 1
    assert "| stale | table |" in capsys.readouterr().out
    assert cli_main(["report", str(doc)]) == 0
    text = doc.read_text()
    assert "| a | 82.00 ± 1.41 | 2 |" in text and "| b | 72.50 ± 2.12 | 2 |" in text
    assert "Prose stays." in text and "More prose." in text and "| stale |" not in text
    assert "- a beats b (a − b > 0): +9.50 [+0.53, +18.47] points → **holds**" in text
    assert cli_main(["report", str(doc), "--check"]) == 0
    # a changed result makes the doc stale again
    results = doc.parent / "results.jsonl"
    results.write_text(results.read_text().replace("0.83", "0.93"))
    assert cli_main(["report", str(doc), "--check"]) == 1


def test_a_summary_lists_a_docs_verdicts_as_its_results_give_them_now(tmp_path):
    """``verdicts doc=...`` (the README's summary) repeats the study's verdict lines, rebuilt from the study's
    results, so a changed result makes the summary stale too; prose list items are not verdicts."""
    doc = _doc(tmp_path, "- a prose item → not generated\n\n"
               "<!-- report: verdict results=results.jsonl group=name value=m.acc*100 contrast=a:1,b:-1 "
               'expect=above says="a beats b" -->\n<!-- /report -->\n'
               "<!-- report: verdict results=results.jsonl group=name value=m.acc*100 contrast=b:1,a:-1 "
               'expect=above says="b beats a" -->\n<!-- /report -->\n')
    summary = tmp_path / "README.md"
    summary.write_text("<!-- report: verdicts doc=docs/study.md -->\n<!-- /report -->\n"
                       "<!-- report: verdicts doc=docs/study.md match=\"b beats\" -->\n<!-- /report -->\n")
    assert cli_main(["report", str(summary)]) == 0  # the study doc itself is still stale: not needed
    text = summary.read_text()
    both = ("- a beats b (a − b > 0): +9.50 [+0.53, +18.47] points → **holds**\n"
            "- b beats a (b − a > 0): -9.50 [-18.47, -0.53] points → **fails**\n")
    assert text.startswith("<!-- report: verdicts doc=docs/study.md -->\n" + both) and "prose item" not in text
    assert text.count("b beats a") == 2 and text.count("a beats b") == 1
    results = doc.parent / "results.jsonl"
    results.write_text(results.read_text().replace("0.83", "0.93"))
    assert cli_main(["report", str(summary), "--check"]) == 1
    for head, error in (("doc=docs/study.md match=nothing", "no generated verdict line containing 'nothing'"),
                        ("doc=docs/missing.md", "missing.md: doc not found")):
        summary.write_text(f"<!-- report: verdicts {head} -->\n<!-- /report -->\n")
        with pytest.raises(ConfigError, match=error):
            report.report([summary], check=True)


def test_bad_markers_name_the_doc_and_line(tmp_path):
    doc = _doc(tmp_path, "x\n<!-- report: nonsense a=1 -->\n<!-- /report -->\n")
    with pytest.raises(ConfigError, match=r"study.md:2: unknown report kind 'nonsense'"):
        report.report([doc], check=True)
    doc.write_text("<!-- report: table results=missing.jsonl group=name columns=x -->\n<!-- /report -->\n")
    with pytest.raises(ConfigError, match="missing.jsonl: results file not found"):
        report.report([doc], check=True)
    doc.write_text("<!-- report: table results=results.jsonl group=name columns=x wrong -->\n<!-- /report -->\n")
    with pytest.raises(ConfigError, match="must look like key=value"):
        report.report([doc], check=True)


def test_every_doc_equals_what_its_results_give():
    """The committed docs' generated blocks are exactly what `vitkit report` rebuilds from committed results."""
    paths = report.doc_paths(report.DEFAULT_DOCS, ROOT)
    assert paths, "no doc has generated blocks"
    changed = report.report(paths, check=True)
    assert not changed, "docs differ from their results; run `vitkit report`:\n" + "\n".join(d for _, d in changed)


def test_an_indented_marker_is_an_example_left_alone(tmp_path):
    text = ("Example:\n\n    <!-- report: table results=results.jsonl group=name columns=x -->\n    ...\n"
            "    <!-- /report -->\n")
    doc = _doc(tmp_path, text)
    assert report.report([doc], check=True) == [] and doc.read_text() == text
