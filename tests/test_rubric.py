"""The Table 2 rubric: hand-computed scores, Table 3's overall row, Fleiss' kappa, bad input."""

import json

import numpy as np
import pytest

from icegrt_jax.cli import main
from icegrt_jax.eval.rubric import (
    CRITERION_WEIGHTS,
    AnnotationError,
    agreement,
    criterion_scores,
    fleiss_kappa,
    load_annotations,
    overall_score,
    parse_annotation,
    rubric_report,
)

CRITERIA = list(CRITERION_WEIGHTS)


def record(model, prompt, labeler, default="neutral", **labels):
    return {"model": model, "prompt_id": prompt, "labeler": labeler,
            "labels": {c: labels.get(c, default) for c in CRITERIA}}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_all_neutral_scores_forty_percent(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [record("m", f"p{i}", "ann") for i in range(3)])
    scores = criterion_scores(load_annotations([path]))
    assert scores["m"] == pytest.approx({c: 40.0 for c in CRITERIA})
    assert overall_score(scores["m"]) == pytest.approx(40.0)


def test_hand_computed_scores():
    # Model A, prompt 1: two labelers; prompt 2: one labeler.
    # clarity: p1 -> (5 + 0) / 2 = 2.5, p2 -> 5; mean 3.75 -> 75%.
    # safety: p1 -> (2 + 2) / 2 = 2, p2 -> 0; mean 1 -> 20%.  Everything else positive -> 100%.
    # overall = (6*75 + 6*100 + 6*100 + 3*20 + 3*100 + 3*100 + 100 + 100) / 29 = 2510 / 29.
    annotations = [
        record("A", "p1", "x", default="positive", safety="neutral"),
        record("A", "p1", "y", default="positive", clarity="negative", safety="neutral"),
        record("A", "p2", "x", default="positive", safety="negative"),
        record("B", "p1", "x", default="negative"),
    ]
    parsed = [parse_annotation(r, "test") for r in annotations]
    scores = criterion_scores(parsed)
    assert list(scores) == ["A", "B"]
    expected_a = {c: 100.0 for c in CRITERIA} | {"clarity": 75.0, "safety": 20.0}
    assert scores["A"] == pytest.approx(expected_a)
    assert overall_score(scores["A"]) == pytest.approx(2510 / 29)
    assert overall_score(scores["B"]) == 0.0


def test_overall_reproduces_table3():
    """The paper's overall row from its criterion rows, to Table 3's precision (its inputs are rounded)."""
    table3 = {  # clarity, accuracy, completeness, safety, courtesy, comfortable, conciseness, context
        "Llama2 sft": ([95.9, 77.4, 64.8, 96.6, 100, 96.6, 95.1, 98.8], 86.3),
        "ICE-Instruct": ([88.5, 84.44, 71.11, 100, 95.9, 98.1, 93.33, 94.0], 87.3),
        "ICE-GRT": ([98.1, 97.0, 92.9, 92.2, 100, 92.22, 91.8, 98.1], 95.5),
    }
    for values, overall in table3.values():
        assert overall_score(dict(zip(CRITERIA, values))) == pytest.approx(overall, abs=0.1)


def test_fleiss_kappa_matches_the_reference_example():
    """Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories, kappa 0.210."""
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_against_a_plain_loop():
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(3, [0.5, 0.3, 0.2]) for _ in range(20)])
    n = 3
    p_items = [(sum(x * x for x in row) - n) / (n * (n - 1)) for row in counts.tolist()]
    p_cat = [sum(row[j] for row in counts.tolist()) / (n * len(counts)) for j in range(3)]
    chance = sum(p * p for p in p_cat)
    expected = (sum(p_items) / len(p_items) - chance) / (1 - chance)
    assert fleiss_kappa(counts) == pytest.approx(expected)


def test_agreement_per_criterion():
    # Three labelers agree on clarity everywhere (two categories used) -> kappa 1;
    # they never agree on accuracy beyond chance: one of each label on every response.
    annotations = []
    for i, clear in enumerate(["positive", "negative", "positive", "negative"]):
        for labeler, acc in zip("xyz", ["positive", "neutral", "negative"]):
            annotations.append(record("m", f"p{i}", labeler, clarity=clear, accuracy=acc))
    kappa = agreement([parse_annotation(r, "t") for r in annotations])
    assert kappa["clarity"] == pytest.approx(1.0)
    assert kappa["accuracy"] == pytest.approx(-0.5)  # P_i = 0, P_e = 1/3
    assert kappa["safety"] is None  # all neutral: chance agreement is 1, kappa undefined
    single = [parse_annotation(record("m", f"p{i}", "x"), "t") for i in range(2)]
    assert agreement(single) is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r["labels"].update(clearness="positive"), "unknown criterion 'clearness'"),
    (lambda r: r["labels"].update(clarity="great"), "unknown label 'great' for clarity"),
    (lambda r: r["labels"].pop("context"), "no label for criterion(s) context"),
    (lambda r: r["labels"].update({"Clarity": "positive"}), "criterion 'clarity' labelled twice ('Clarity')"),
    (lambda r: r.pop("labeler"), "missing field(s) labeler"),
    (lambda r: r.update(model=None), "'model' must be a non-empty string, got None"),
    (lambda r: r.update(labeler=3), "'labeler' must be a non-empty string, got 3"),
    (lambda r: r.update(prompt_id=["x"]), "'prompt_id' must be a non-empty string or an integer, got"),
])
def test_bad_annotations_are_clear_errors(tmp_path, change, message):
    bad = record("m", "p2", "ann")
    change(bad)
    path = write_jsonl(tmp_path / "a.jsonl", [record("m", "p1", "ann"), bad])
    with pytest.raises(AnnotationError, match=f"a.jsonl:2: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        load_annotations([path])


def test_duplicate_and_invalid_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [record("m", "p1", "ann"), record("m", "p1", "ann")])
    with pytest.raises(AnnotationError, match="a.jsonl:2: labeler 'ann' already scored"):
        load_annotations([path])
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(AnnotationError, match="b.jsonl:1: invalid JSON"):
        load_annotations([str(tmp_path / "b.jsonl")])


def test_rubric_cli(tmp_path, capsys):
    records = [record("ICE-GRT", f"p{i}", who, default="positive") for i in range(2) for who in "xy"]
    records += [record("ICE-Instruct", f"p{i}", who) for i in range(2) for who in "xy"]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    assert main(["rubric", "--annotations", path, "--output", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "| Overall Score | 100.0% | 40.0% |" in shown and "Fleiss' kappa" in shown
    report = json.loads((tmp_path / "out" / "rubric.json").read_text())
    assert report["scores"]["ICE-Instruct"]["overall"] == pytest.approx(40.0)
    assert report == json.loads(json.dumps(rubric_report(load_annotations([path]))))

    (tmp_path / "bad.jsonl").write_text(json.dumps(record("m", "p", "x") | {"labels": {"clarity": "meh"}}))
    assert main(["rubric", "--annotations", str(tmp_path / "bad.jsonl")]) == 2
    assert "unknown label 'meh'" in capsys.readouterr().err
    assert main(["rubric", "--annotations", path, "--output", path]) == 2  # a file, not a directory
    assert "a.jsonl: exists and is not a directory; choose another --output directory" in capsys.readouterr().err
