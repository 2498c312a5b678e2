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


def test_accuracy_lines_plot_the_runs_of_a_study_by_the_variable_its_variant_names_encode(tmp_path, monkeypatch):
    """``ablation_lines``: one series per pattern, a point per x token that has runs (the others left out), each
    point the test values of that variant's seeds; an x token that names no variant is an error naming it."""
    import vitkit.viz.plots as plots

    doc = _doc(tmp_path, "")
    rows = [{"study": "vit_cnn_data", "variant": f"{m}_{x}", "lr": 2e-3, "seed": s, "metric": "top1",
             "final": {"top1": 0.5}, "test": {"top1": acc + 0.01 * s}, "params": 1, "train_img_s": 1.0,
             "wall_clock_s": 1.0, "epochs": 5}
            for m, x, acc in [("vit", "1pct", 0.6), ("vit", "100pct", 0.9), ("resnet", "1pct", 0.7)]
            for s in (0, 1)]
    (doc.parent / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}
    monkeypatch.setattr(plots, "plot_lines", lambda series, path, *a, **kw: drawn.update(series=series, path=path,
                                                                                       **kw))
    head = ('ablation_lines results=results.jsonl study=vit_cnn_data image=lines.png logx=true '
            'series="ViT:vit_{x};ResNet:resnet_{x}" x="1pct:1:1%;10pct:10:10%;100pct:100:100%"')
    doc.write_text(f"<!-- report: {head} -->\n<!-- /report -->\n")
    assert cli_main(["report", str(doc)]) == 0
    assert "![vit_cnn_data](lines.png)" in doc.read_text()
    assert drawn["series"] == {"ViT": [(1.0, pytest.approx([60.0, 61.0])), (100.0, pytest.approx([90.0, 91.0]))],
                               "ResNet": [(1.0, pytest.approx([70.0, 71.0]))]}
    assert drawn["logx"] is True and drawn["xticks"] == [(1.0, "1%"), (10.0, "10%"), (100.0, "100%")]
    doc.write_text(f"<!-- report: {head.replace('10pct:10:10%', '2pct:2')} -->\n<!-- /report -->\n")
    with pytest.raises(ConfigError, match=r"series 'ViT': study 'vit_cnn_data' has no variants \['vit_2pct'\]"):
        report.report([doc], check=True)


def test_plot_lines_draws_a_file(tmp_path):
    from vitkit.viz.plots import plot_lines

    plot_lines({"a": [(1.0, [60.0, 61.0]), (10.0, [80.0])]}, tmp_path / "l.png", "t", "x", "y", logx=True,
               xticks=[(1.0, "1"), (10.0, "10")])
    assert (tmp_path / "l.png").stat().st_size > 1000


def test_a_verdict_per_run_averages_each_runs_records_first(tmp_path):
    """``per=run``: per-head records of one run count once (their mean), so the interval's seeds are runs."""
    doc = _doc(tmp_path, "")
    rows = [{"group": g, "run": f"{g}_s{s}", "head": h, "e": base + 0.01 * s + 0.1 * h}
            for g, base in (("relu", 0.9), ("softmax", 0.5)) for s in (0, 1) for h in (0, 1, 2)]
    (doc.parent / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc.write_text('<!-- report: verdict results=results.jsonl group=group per=run value=e unit="" digits=3 '
                   'contrast=relu:1,softmax:-1 expect=above says="flatter" -->\n<!-- /report -->\n')
    assert cli_main(["report", str(doc)]) == 0
    # two runs a group, values 0.01 apart: Welch with df 2 (t 4.303) gives ±0.030
    assert "- flatter (relu − softmax > 0): +0.400 [+0.370, +0.430] → **holds**" in doc.read_text()
    doc.write_text(doc.read_text().replace("per=run ", ""))
    assert cli_main(["report", str(doc)]) == 0
    assert "+0.400 [+0.370, +0.430]" not in doc.read_text()  # heads counted as if they were seeds


def test_report_help_lists_every_kind(capsys):
    assert set(report.KIND_HELP) == set(report.SECTIONS)
    with pytest.raises(SystemExit):
        cli_main(["report", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {kind} " in out for kind in report.SECTIONS)
