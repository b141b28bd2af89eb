"""``keyscope evaluate``, ``bounds`` and ``reproduce`` on the shipped factworld model, in-process."""

from __future__ import annotations

import csv
import json

import pytest

from keyscope.cli import main
from keyscope.evaluation.metrics import METRICS

QUICK = ["--no-progress", "--cov-tokens", "20000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(cache, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(cache))


def test_evaluate_prints_table1_writes_it_and_sweeps_tau(env, tmp_path, capsys):
    out, report = tmp_path / "figs", tmp_path / "t1.json"
    code = main(["evaluate", "--n", "2", "--tau-sweep", "0.5,0.9", "--out", str(out), "--json", str(report), *QUICK])
    assert code == 0
    text = capsys.readouterr().out
    assert "Rephrase OOD" in text and "rome+rep" in text
    payload = json.loads(report.read_text())
    assert payload["n"] == 2 and set(payload["methods"]) >= {"rome", "rome+rep", "rome+rep@0.5", "rome+rep@0.9"}
    for name in ("table1.csv", "table1.md", "table1_facts.csv", "fig7_tau_sweep.png", "fig7_tau_sweep.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table1_facts.csv", newline="", encoding="utf-8") as handle:
        per_fact = list(csv.DictReader(handle))
    for method, row in payload["methods"].items():  # every rate is the pooled hits / prompts of the per-fact CSV
        mine = [r for r in per_fact if r["method"] == method]
        assert len(mine) == 2, method
        for m in METRICS:
            hits, total = (sum(int(r[f"{m}_{c}"]) for r in mine) for c in ("hits", "total"))
            assert row["counts"][m] == total and 0 <= hits <= total, (method, m)
            assert row[m] == (None if total == 0 else pytest.approx(hits / total)), (method, m)
    rome_row, rep_row = payload["methods"]["rome"], payload["methods"]["rome+rep"]
    assert rome_row["counts"] == rep_row["counts"]  # both methods scored on the same prompts
    assert rome_row["counts"]["success"] == 2 and rome_row["counts"]["rephrase_ood"] > 0
    assert rome_row["counts"]["locality"] > 0
    # ROME edits of known factworld facts work and keep the neighbours (README: 97% and 96%)
    assert rome_row["success"] == 1.0 and rome_row["locality"] >= 0.8
    # the sweep's τ equal to REP's own is the same evaluation as rome+rep
    assert payload["rep_config"]["tau"] == 0.9
    assert {m: payload["methods"]["rome+rep@0.9"][m] for m in METRICS} == {m: rep_row[m] for m in METRICS}
    assert "| rome+rep |" in (out / "table1.md").read_text()


def test_evaluate_trains_rep_in_the_released_codes_setting(env, tmp_path):
    report = tmp_path / "released.json"
    code = main(["evaluate", "--n", "1", "--rep-setting", "released", "--out", str(tmp_path), "--json", str(report),
                 *QUICK])
    assert code == 0
    payload = json.loads(report.read_text())
    config = payload["rep_config"]
    assert (config["objective"], config["anchor"], config["batch_size"], config["positive_prefixes"]) == (
        "released", "bare", 15, True)
    assert payload["methods"]["rome+rep"]["counts"]["success"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--methods", "pmet"], "--methods"),  # not (yet) in the registry
    (["--tau-sweep", "0.5,1.5"], "--tau-sweep"),
    (["--tau", "0"], "--tau"),
    (["--n", "0"], "--n"),
    (["--methods", "rome", "--tau-sweep", "0.5"], "rome+rep"),
    (["--rep-setting", "original"], "--rep-setting"),
])
def test_evaluate_rejects_bad_arguments_in_one_line(env, tmp_path, capsys, argv, message):
    assert main(["evaluate", "--out", str(tmp_path), *argv, *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err


def test_bounds_reports_the_three_lemmas(env, tmp_path, capsys):
    report = tmp_path / "bounds.json"
    code = main(["bounds", "--n", "2", "--scan-tokens", "3000", "--out", str(tmp_path), "--json", str(report), *QUICK])
    assert code == 0
    assert "Lemma 4.4" in capsys.readouterr().out
    payload = json.loads(report.read_text())
    assert {"holds_fraction", "norm_bound_holds_fraction"} <= set(payload["lemma_4_4"])
    assert {"auroc", "value_check_pearson", "positives", "methods"} <= set(payload["lemma_4_6"])
    for group in ("neighbourhood", "corpus"):
        assert {"auroc", "positives", "n_queries"} <= set(payload["lemma_4_7"][group])
    assert payload["lemma_4_7"]["positives"] == sum(payload["lemma_4_7"][g]["positives"] for g in ("neighbourhood", "corpus"))
    assert set(payload["lemma_4_6"]["methods"]) == {"rome", "rome+rep"}
    for name in ("fig_bounds.png", "bounds.md", "bounds_edits.csv", "bounds_queries.csv"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize("argv, message", [
    (["--methods", "pmet"], "--methods"),
    (["--methods", "memit", "--rome-only"], "--rome-only"),
])
def test_bounds_rejects_bad_methods_in_one_line(env, tmp_path, capsys, argv, message):
    assert main(["bounds", "--out", str(tmp_path / "o"), *argv, *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_reproduce_quick_regenerates_every_artefact_and_the_report(env, tmp_path):
    assert main(["reproduce", "--quick", "--no-progress", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rep_config"]["tau"] == 0.9  # REP's settings recorded
    for name in ("fig3_similarity.png", "fig3_pca.png", "fig4_neighbors.png", "fig5_value_norms.png",
                 "fig7_tau_sweep.png", "fig_bounds.png", "table1.md", "REPORT.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("Figure 3", "Figure 4", "Figure 5", "Table 1", "Figure 7", "Lemma 4.4", "Lemma 4.6"):
        assert section in report, section


@pytest.mark.slow
def test_evaluate_ablate_reports_every_variant(env, tmp_path, capsys):
    out, report = tmp_path / "figs", tmp_path / "ablation.json"
    assert main(["evaluate", "--ablate", "--n", "1", "--out", str(out), "--json", str(report), *QUICK]) == 0
    payload = json.loads(report.read_text())
    from keyscope.evaluation.ablation import VARIANTS

    assert list(payload["variants"]) == [v.name for v in VARIANTS]
    for name, entry in payload["variants"].items():
        assert set(METRICS) <= set(entry) and "ci" in entry and "departure" in entry
        if name != "keyscope":  # the paired difference to keyscope's setting, per metric
            assert set(entry["difference"]) == set(METRICS) and set(entry["difference_ci"]) == set(METRICS)
    assert "difference" not in payload["variants"]["keyscope"]
    assert "success_diff_lo" in (out / "ablation.csv").read_text().splitlines()[0]
    assert set(payload["baselines"]) == {"rome", "rome (reference)"}
    assert (out / "ablation.md").is_file() and (out / "ablation.csv").is_file()
    assert "released" in capsys.readouterr().out
    assert main(["evaluate", "--ablate", "--tau-sweep", "0.5", *QUICK]) == 2


def test_values_runs_rome_in_reference_mode(env, tmp_path):
    report = tmp_path / "values.json"
    assert main(["values", "--rome-setting", "reference", "--n", "2", "--out", str(tmp_path / "o"),
                 "--json", str(report), *QUICK]) == 0
    payload = json.loads(report.read_text())
    assert payload["rome_config"]["reference"] is True
    assert payload["n"] == 2 and payload["success"] == 1.0 and payload["locality"] >= 0.8  # README: 96% and 97%
    assert main(["values", "--rome-setting", "exact", *QUICK]) == 2


@pytest.mark.slow
def test_torchrun_two_gloo_processes_give_the_single_process_rows(tmp_path, keyscope_processes):
    """Both runs read the same cached C; the 2-process run edits alternate facts and gathers the rows in fact
    order. ``--n-facts``: torchrun's own parser would take ``--n`` for an abbreviation of its options."""
    argv = ["evaluate", "--n-facts", "4", "--methods", "rome", *QUICK]
    cache = tmp_path / "cache"
    keyscope_processes([*argv, "--out", tmp_path / "one", "--json", tmp_path / "one.json"], cache)
    two = keyscope_processes([*argv, "--out", tmp_path / "two", "--json", tmp_path / "two.json"], cache, nproc=2)
    assert two.stdout.count("wrote ") == 4  # rank 0 alone writes: three tables and the JSON
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["table1.csv", "table1.md", "table1_facts.csv"]
    for name in ("table1_facts.csv", "table1.csv", "table1.md"):  # per-fact rows in fact order, summary, intervals
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    one, two_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for report in (one, two_report):
        del report["seconds"]
    assert two_report == one and one["n"] == 4
    assert not list((cache / "fact_rows_checkpoint").glob("*/*"))  # each rank removed its checkpoint


@pytest.mark.slow
def test_evaluate_resume_continues_a_stopped_run_to_the_same_table(env, cache, tmp_path, capsys, monkeypatch):
    """A run stopped after its first fact keeps that fact's rows; ``--resume`` scores only the others and writes the
    uninterrupted run's files, byte for byte (the JSON but for its wall-clock seconds); the checkpoint is then gone."""
    from keyscope.evaluation import evaluate as ev

    argv = ["evaluate", "--n", "2", *QUICK]
    assert main([*argv, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    real, scored = ev.evaluate_batch, []

    def stopped_after_one(model, items, *args, **kwargs):
        if scored:
            raise KeyboardInterrupt
        scored.extend(fact.case_id for fact, _ in items)
        return real(model, items, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_batch", stopped_after_one)
    assert main([*argv, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")]) == 130
    assert not (tmp_path / "two").exists()  # the outputs of a stopped run are removed; its checkpoint stays
    assert len(list((cache / ev.CHECKPOINT_KIND).glob("*/rank0of1.json"))) == 1
    capsys.readouterr()
    monkeypatch.setattr(ev, "evaluate_batch", lambda model, items, *args, **kwargs: (
        scored.extend(fact.case_id for fact, _ in items), real(model, items, *args, **kwargs))[1])
    assert main([*argv, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json"), "--resume"]) == 0
    assert "restored 1 of 2 facts from a checkpoint" in capsys.readouterr().out
    assert len(scored) == 2 and len(set(scored)) == 2  # the restored fact was not scored again
    for name in ("table1.csv", "table1.md", "table1_facts.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for report in (one, two):
        del report["seconds"]
    assert two == one
    assert not list((cache / ev.CHECKPOINT_KIND).iterdir())  # removed once the table is written
    # another setting finds no checkpoint of its own: one warning line, and a fresh run
    assert main([*argv, "--n", "1", "--out", str(tmp_path / "three"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "keyscope: warning: no checkpoint of this run" in err
