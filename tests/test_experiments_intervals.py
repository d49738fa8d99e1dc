"""The table's paired intervals (experiments/intervals.py) and the test-set units they resample
(experiments/clusters.py)."""

import math

import numpy as np
import pytest

from experiments.clusters import SplitUnits, check_cell_fits, clusters_for
from experiments.intervals import paired_bootstrap, student_t_quantile


def test_student_t_quantile_matches_closed_forms_and_tables():
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-7)  # Cauchy
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), abs=1e-7)
    assert student_t_quantile(0.975, 8) == pytest.approx(2.306004, abs=1e-6)   # printed t tables
    assert student_t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert student_t_quantile(0.95, 4) == pytest.approx(2.131847, abs=1e-6)
    assert student_t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)
    assert 2.015048 < student_t_quantile(0.95, 4.5) < 2.131847  # fractional df, as Welch-Satterthwaite gives
    assert student_t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="p must be in"):
        student_t_quantile(0.2, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        student_t_quantile(0.975, 0)


def _correct(ones: int, n: int) -> str:
    return "1" * ones + "0" * (n - ones)


def test_seed_spread_is_scaled_by_student_t_for_few_seeds():
    """Three seeds of one task at deltas 0.0 / 0.1 / 0.2 on 10,000 examples (so that the test-set term is
    negligible): the half-width is the training term's t(0.975, 2) * sd / sqrt(3) = 4.30 * 0.1 / 1.73 = 0.248; a
    normal or percentile reading of three seeds gives far less (the earlier bootstrap, resampling the seeds:
    about 0.14)."""
    n = 10_000
    b = "0" * n
    a = [_correct(0, n), _correct(n // 10, n), _correct(n // 5, n)]
    delta, low, high = paired_bootstrap(a, [b] * 3, tasks=["t"] * 3, replicates=400)
    assert delta == pytest.approx(0.1)
    assert high - delta == pytest.approx(student_t_quantile(0.975, 2) * 0.1 / math.sqrt(3), rel=0.01)
    assert high - delta == pytest.approx(delta - low)  # symmetric around the estimate
    # the same per-seed results read as three tasks of one seed each carry no training term: test-set noise only
    _, low_tasks, high_tasks = paired_bootstrap(a, [b] * 3, tasks=["t1", "t2", "t3"], replicates=400)
    assert high_tasks - low_tasks < 0.1 * (high - low)


def test_intervals_cover_the_true_difference_with_few_seeds():
    """Simulated grids where training noise dominates (seeds agree on most test examples, as tuned adapters do;
    the seed effect has sd 3 points): the 95% intervals must cover the true difference (0) in about 95% of the
    grids. A percentile bootstrap over the three seeds covered it in about 78% of them."""
    rng = np.random.default_rng(7)
    covered, grids = 0, 150
    for grid in range(grids):
        pairs_a, pairs_b = [], []
        p, u = rng.uniform(0.6, 0.9, 300), rng.random(300)
        for _ in range(3):
            shift, jitter = rng.normal(0.0, 0.03), 0.05 * rng.random(300)
            pairs_b.append("".join("1" if x else "0" for x in (u + jitter) < p))
            pairs_a.append("".join("1" if x else "0" for x in (u + jitter) < np.clip(p + shift, 0, 1)))
        _, low, high = paired_bootstrap(pairs_a, pairs_b, tasks=["t"] * 3, replicates=300, seed=grid)
        covered += low <= 0.0 <= high
    assert covered / grids >= 0.9


def test_welch_degrees_of_freedom_follow_the_tasks_that_vary():
    """Two tasks of three seeds on 10,000 examples: one whose seeds agree, one whose seeds spread (deltas -0.1 /
    0 / +0.1); the half-width is then set by the spreading task's t(0.975, 2) = 4.30, not by a pooled 4 degrees
    of freedom (2.78)."""
    n = 10_000
    same = [_correct(n // 2, n)] * 3
    spread = [_correct(2 * n // 5, n), _correct(n // 2, n), _correct(3 * n // 5, n)]
    base = [_correct(n // 2, n)] * 6
    delta, low, high = paired_bootstrap(same + spread, base, tasks=["t"] * 3 + ["u"] * 3, replicates=400)
    assert delta == pytest.approx(0.0, abs=1e-12)
    training = 0.1 / math.sqrt(3) / 2  # the spreading task's standard error, halved by the two-task mean
    assert high - delta == pytest.approx(student_t_quantile(0.975, 2) * training, rel=0.01)


def _units(gold, units=None) -> SplitUnits:
    return SplitUnits(tuple(units or range(len(gold))), tuple((f"text {i}", label) for i, label in enumerate(gold)))


def _cell(**fields) -> dict:
    return {"setting": "nf4", "task": "t", "row": "cpet", "seed": 0, "commit": "abc", **fields}


def test_a_cell_of_another_split_is_refused_before_its_units_are_used():
    units = _units(["pos", "neg", "pos"])
    whole = units.prefix_sha256(3)
    check_cell_fits(_cell(test_sha256=whole, test_correct="101"), units)  # the same split: accepted
    # scored with --test-limit 2: its hash covers the first two examples, and it fits them
    check_cell_fits(_cell(test_sha256=units.prefix_sha256(2), test_correct="10"), units)
    with pytest.raises(SystemExit, match="scored another t test split than this checkout builds"):
        check_cell_fits(_cell(test_sha256="g" * 64, test_correct="101"), units)
    with pytest.raises(SystemExit, match="scored another t test split"):  # a whole-split hash on two examples
        check_cell_fits(_cell(test_sha256=whole, test_correct="10"), units)
    with pytest.raises(SystemExit, match="scored 4 test examples, more than the 3"):
        check_cell_fits(_cell(test_sha256=whole, test_correct="1011"), units)
    # cells made before the grid recorded the split's hash: checked label by label through their predictions
    check_cell_fits(_cell(test_predictions=["pos", "pos", "pos"], test_correct="101"), units)
    with pytest.raises(SystemExit, match="predictions do not match this checkout's t test split"):
        check_cell_fits(_cell(test_predictions=["pos", "pos", "pos"], test_correct="110"), units)  # reordered
    with pytest.raises(SystemExit, match="predictions do not match"):
        check_cell_fits(_cell(test_predictions=["pos", "pos"], test_correct="101"), units)  # fewer predictions
    with pytest.raises(SystemExit, match="records neither test_sha256 nor test_predictions"):
        check_cell_fits(_cell(test_correct="101"), units)


def test_units_follow_a_test_limit(monkeypatch):
    """Cells scored on the first N test examples are resampled by the units of those N."""
    import experiments.clusters as clusters

    units = _units(["pos", "neg", "pos", "neg"], units=["a", "a", "b", "c"])
    monkeypatch.setattr(clusters, "split_units", lambda task: units)
    monkeypatch.setitem(clusters.UNITS_OF_TASK, "t", lambda: list(units.units))
    cell = _cell(test_sha256=units.prefix_sha256(3), test_correct="101")
    assert clusters_for([cell], ["t"]) == {"t": ("a", "a", "b")}
    other = _cell(test_sha256=units.prefix_sha256(2), test_correct="10")
    with pytest.raises(SystemExit, match="scored another t test split|different numbers of test examples"):
        clusters_for([cell, other], ["t"])


def test_vader_product_and_news_intervals_resample_reviews_and_editorials():
    """Since the document-level split, product's and news' test sets are whole reviews / editorials: their
    sentences are not independent, and the table resamples them a document at a time."""
    from cpet.data.tasks import examples_sha256, load_task
    from cpet.data.vader import groups_of_test_split

    for domain, sentences, documents in (("product", 287, 24), ("news", 294, 53)):
        groups = groups_of_test_split(domain)
        assert (len(groups), len(set(groups))) == (sentences, documents)
        task = load_task(f"vader-{domain}")
        cell = _cell(task=f"vader-{domain}", test_sha256=examples_sha256(task.split("test")),
                     test_correct="1" * sentences)
        assert clusters_for([cell], [f"vader-{domain}"]) == {f"vader-{domain}": tuple(groups)}
        # no review of the test split appears in train (the units are what the split kept together)
        assert not set(groups) & set(_train_groups(domain))
    movie = groups_of_test_split("movie")
    assert len(set(movie)) == len(movie)  # one sentence per snippet: every example its own unit


def _train_groups(domain: str) -> list[int]:
    from cpet.data.dedup import normalised_key
    from cpet.data.vader import _vader_task_and_groups

    task, group_of = _vader_task_and_groups(domain, None)
    return [group_of[normalised_key(e.text)] for e in task.split("train")]


def test_the_table_refuses_cells_of_another_split_unless_told_to_resample_examples(capsys):
    """A vader-product cell from before the document-level split (another test_sha256): its examples cannot be
    mapped to reviews, so the table stops; --examples-as-units lets it through, and the table says so."""
    from experiments.table import INTERVALS_NOTE, main as table_main, table

    old_split = "0" * 64
    a, b = "1" * 200 + "0" * 87, "1" * 150 + "0" * 137
    cells = [{"setting": setting, "task": "vader-product", "row": row, "seed": 0, "test_accuracy": acc,
              "test_correct": correct, "test_sha256": old_split, "history": []}
             for setting, row, acc, correct in (("original", "original", 0.7, a), ("nf4", "vanilla", 0.5, b),
                                                ("nf4", "cpet", 0.7, a))]
    rows = ["original", "vanilla", "cpet"]
    with pytest.raises(SystemExit, match="scored another vader-product test split than this checkout builds.*"
                                         "pass --examples-as-units vader-product"):
        table(cells, ["nf4"], ["vader-product"], rows, [0])
    text = table(cells, ["nf4"], ["vader-product"], rows, [0], examples_as_units=["vader-product"])
    assert "CPET − original = +0.0 points" in text and INTERVALS_NOTE in text
    assert "The intervals of vader-product resample test examples one at a time (`--examples-as-units`)" in text
    with pytest.raises(SystemExit):
        table_main(["--examples-as-units", "vader-movie", "--tasks", "vader-movie"])
    assert "vader-movie has no known units" in capsys.readouterr().err


def test_a_note_file_survives_regenerating_the_document(tmp_path):
    from experiments.table import main as table_main

    cells_dir = tmp_path / "cells"
    cells_dir.mkdir()
    (cells_dir / "a.json").write_text('{"setting": "nf4", "task": "t", "row": "vanilla", "seed": 0, '
                                      '"test_accuracy": 0.5, "commit": "abc", "history": []}')
    note = tmp_path / "note.md"
    note.write_text("**Superseded.** Kept for the record.\n")
    doc = tmp_path / "doc.md"
    for _ in range(2):
        table_main(["--cells", str(cells_dir), "--tasks", "t", "--settings", "nf4", "--rows", "vanilla",
                    "--note-file", str(note), "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# CPET comparison table\n\n**Superseded.** Kept for the record.\n\nGenerated by")
    assert text.count("Superseded") == 1
    with pytest.raises(SystemExit):
        table_main(["--cells", str(cells_dir), "--tasks", "t", "--note-file", str(tmp_path / "missing.md")])


def test_cells_without_a_hash_are_checked_against_each_other(tmp_path):
    """Two cells of one task that predate test_sha256 must be consistent with one gold sequence: right on an
    example -> the same label; exactly one right -> different labels."""
    import json

    from experiments.table import load_cells

    def write(name, predictions, correct):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"setting": "nf4", "task": "t", "row": name, "seed": 0, "commit": "abc",
             "test_accuracy": correct.count("1") / len(correct), "test_n": len(correct),
             "test_predictions": predictions, "test_correct": correct}))

    write("vanilla", ["pos", "neg", "pos"], "101")
    write("cpet", ["neg", "neg", "pos"], "101")
    with pytest.raises(SystemExit, match="t: test example 0: cells right with different labels"):
        load_cells(tmp_path)  # both right, one with pos, the other with neg
    write("cpet", ["pos", "neg", "pos"], "111")
    with pytest.raises(SystemExit, match="test example 1: label 'neg' marked right in one cell and wrong"):
        load_cells(tmp_path)  # vanilla wrong with neg, cpet right with the same neg
    write("cpet", ["pos", "pos", "neg"], "110")  # consistent with gold pos, pos, pos
    assert len(load_cells(tmp_path)) == 2
    # three labels: every pair of cells is consistent with the first, but not all three together
    write("vanilla", ["x", "a", "a"], "000")
    write("cpet", ["y", "a", "a"], "100")
    write("inherit", ["z", "a", "a"], "100")
    with pytest.raises(SystemExit, match="test example 0: cells right with different labels"):
        load_cells(tmp_path)


def test_the_seed_x_example_interaction_is_not_counted_twice():
    """Seeds that differ only example by example (independent right/wrong per seed and example, no seed effect)
    spread their per-seed deltas by sigma_e^2 / n, which the test-set term already holds: the training term must
    not count it again. Averaged over 300 such tasks the corrected variance is far below the raw one (clamping at
    zero keeps about 0.37 of it on average, the raw variance is all of it)."""
    from experiments.intervals import _seed_variance

    rng = np.random.default_rng(0)
    raw, corrected = [], []
    for _ in range(300):
        a = (rng.random((3, 2000)) < 0.8).astype(np.int8)
        b = (rng.random((3, 2000)) < 0.8).astype(np.int8)
        diffs = a - b
        raw.append(diffs.mean(axis=1).var(ddof=1))
        corrected.append(_seed_variance(diffs, None))
    assert np.mean(corrected) < 0.5 * np.mean(raw)
    # a real seed effect (whole-example shifts of 0, 5 and 10 points) is kept almost whole
    shifted = np.zeros((3, 2000), dtype=np.int8)
    shifted[1, :100], shifted[2, :200] = 1, 1
    assert _seed_variance(shifted, None) == pytest.approx(shifted.mean(axis=1).var(ddof=1), rel=0.01)


def test_a_one_seed_task_borrows_the_per_seed_variance_of_the_others():
    """Task t has three seeds (deltas 0 / 0.1 / 0.2 on 10,000 examples), task u one seed: u's delta is as
    uncertain per seed as t's, so it borrows t's per-seed variance (0.01) instead of adding no training noise."""
    n = 10_000
    spread = [_correct(0, n), _correct(n // 10, n), _correct(n // 5, n)]
    a = spread + [_correct(n // 10, n)]
    b = ["0" * n] * 4
    delta, low, high = paired_bootstrap(a, b, tasks=["t", "t", "t", "u"], replicates=400)
    assert delta == pytest.approx(0.1)
    t_term, u_term = 0.01 / 3 / 4, 0.01 / 1 / 4  # per-seed variance / seeds / tasks^2
    # both terms rest on t's three seeds: 2 degrees of freedom, not the 3.2 two independent terms would claim
    assert high - delta == pytest.approx(student_t_quantile(0.975, 2) * math.sqrt(t_term + u_term), rel=0.02)


def test_bad_bootstrap_input_is_refused():
    with pytest.raises(ValueError, match="replicates must be >= 2"):
        paired_bootstrap(["10"], ["00"], replicates=1)
    with pytest.raises(ValueError, match="characters other than '0' and '1'"):
        paired_bootstrap(["1x"], ["00"])


def test_the_interaction_estimate_is_unbiased_for_units_of_unequal_size():
    """No seed effect, only a seed x document interaction (each seed shifts each document differently), in
    documents of very unequal size (one holds 40% of the examples): the estimate of the interaction's share of the
    per-seed variance must match that variance on average (the equal-size formula gave 58% of it)."""
    from experiments.intervals import _interaction_variance

    rng = np.random.default_rng(1)
    sizes = np.array([240] + [40] * 6 + [20] * 6)
    units = np.repeat(np.arange(len(sizes)), sizes)
    raw, estimated = [], []
    for _ in range(400):
        shift = rng.normal(0.0, 0.3, (3, len(sizes)))[:, units]
        a = (rng.random((3, units.size)) < np.clip(0.5 + shift, 0, 1)).astype(np.int8)
        b = (rng.random((3, units.size)) < 0.5).astype(np.int8)
        raw.append((a - b).mean(axis=1).var(ddof=1))
        estimated.append(_interaction_variance(a - b, units))
    assert np.mean(estimated) == pytest.approx(np.mean(raw), rel=0.1)


def test_the_test_set_term_is_the_standard_error_of_the_mean_difference():
    """One seed per task: no training term, so the half-width is the test-set term alone, t(0.975, n - 1) times the
    standard error of the per-example differences' mean (the bootstrap's variance times n / (n - 1)). Three
    identical seeds resample one shared test set: the same half-width (independent draws per seed would narrow it
    by sqrt(3))."""
    import numpy as np

    from experiments.intervals import paired_bootstrap, student_t_quantile

    n = 400
    rng = np.random.default_rng(3)
    a = "".join("1" if x else "0" for x in rng.random(n) < 0.8)
    b = "".join("1" if x else "0" for x in rng.random(n) < 0.6)
    d = np.frombuffer(a.encode(), np.uint8).astype(int) - np.frombuffer(b.encode(), np.uint8).astype(int)
    expected = student_t_quantile(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    delta, low, high = paired_bootstrap([a], [b], replicates=4000)
    assert delta == pytest.approx(d.mean())
    assert high - delta == pytest.approx(expected, rel=0.05)
    _, low3, high3 = paired_bootstrap([a] * 3, [b] * 3, tasks=["t"] * 3, replicates=4000)
    assert high3 - low3 == pytest.approx(high - low, rel=0.05)


def test_the_estimate_weighs_every_task_the_same_whatever_its_seed_count():
    """Task t (three seeds, delta 0.3 each) and task u (one seed, delta 0): the point estimate is the mean of the two
    task means, 0.15, not the pooled mean of the four (task, seed) pairs, 0.225."""
    from experiments.intervals import paired_bootstrap, task_weighted_mean

    n = 100
    a = ["1" * 30 + "0" * 70] * 3 + ["0" * n]
    b = ["0" * n] * 4
    delta, low, high = paired_bootstrap(a, b, tasks=["t", "t", "t", "u"], replicates=200)
    assert delta == pytest.approx(0.15) and low < delta < high
    assert task_weighted_mean([0.3, 0.3, 0.3, 0.0], ["t", "t", "t", "u"]) == pytest.approx(0.15)
