"""The result blocks of the README and the docs, rendered from the artefacts committed in ``figures/``.

A block of ``README.md`` or of a page under ``docs/`` lies between ``<!-- keyscope:NAME -->`` and
``<!-- /keyscope:NAME -->`` and holds exactly ``render(NAME, figures)``: every number in it is read from an artefact
file (CSV or JSON) that a command printed in the block wrote. ``python -m keyscope.studies.readme README.md docs
figures`` rewrites every block of the files and folders given (a folder: its ``*.md`` files, recursively) from the
artefacts in the last argument; a block whose artefact is not there yet is left as it was and named on stderr (exit
status 1). ``tests/test_readme.py`` fails when a block and its artefacts disagree, so the prose cannot drift from
the data.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from keyscope._infra.atomic import write_text
from keyscope.data.perturbations import LONG, ORIGINAL, RANDOM, REPHRASE, SHUFFLE, SHUFFLE_WORDS
from keyscope.studies.artefacts import (  # noqa: F401 (also read as readme.X)
    bounds_numbers,
    neighbour_medians,
    rephrase_median,
    similarity_strengths,
    tau_changes,
    value_summary,
)
from keyscope.studies.tables import percent, read_csv

BLOCK = re.compile(r"<!-- keyscope:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /keyscope:(?P=name) -->", re.S)

REPRODUCE = "keyscope reproduce --out figures --json figures/reproduce_timings.json"


def _float(value) -> float | None:
    return None if value in (None, "", "None") else float(value)


def _signed(value: float) -> str:
    value = round(value, 1) or 0.0  # no "−0.0"
    return f"{value:+.1f}".replace("-", "−")


def _by(rows: list[dict], key: str) -> dict[str, dict]:
    return {row[key]: row for row in rows}


# ---------------------------------------------------------------------------------------------- blocks


def similarity(figures: Path) -> str:
    """Figure 3's summary (``fig3_similarity.csv``): the normalised edit strength per perturbation kind."""
    return _similarity_table(figures, "fig3_similarity.csv", REPRODUCE)


#: The fact files of SmolLM2's runs, under ../shared/data (REP's four release files read as one for Figure 3).
_PARAPHRASES = "../shared/data/paraphrases/robustkeyedit_"
SMOLLM2_LLAMA2 = f"{_PARAPHRASES}test.counterfact_para_prompt_para_subject_llama2-7b.json"
SMOLLM2_REP_FILES = ",".join([SMOLLM2_LLAMA2, f"{_PARAPHRASES}test.counterfact_para_prompt_para_subject_mistral.json",
                              f"{_PARAPHRASES}test.counterfact_para_prompt_para_subject_qwen.json",
                              f"{_PARAPHRASES}valid.counterfact_para_prompt_para_subject.json"])
SMOLLM2_COUNTERFACT = "../shared/data/counterfact/counterfact_orig_format_1400_patil.json"
_SMOLLM2 = "--model smollm2-135m"
_ENWIKI = "--corpus ../shared/data/enwiki_extract"
SMOLLM2_SIMILARITY = (f"keyscope similarity {_SMOLLM2} --data {SMOLLM2_REP_FILES} --known {_ENWIKI} --n-subjects 200 "
                      "--out figures/smollm2/similarity --json figures/smollm2/similarity/similarity.json")
SMOLLM2_SCAN = (f"keyscope scan {_SMOLLM2} --data {SMOLLM2_LLAMA2} --known {_ENWIKI} --scan-tokens 1000000 --n-subjects 100 "
                "--out figures/smollm2/scan --json figures/smollm2/scan/scan.json")
SMOLLM2_VALUES = (f"keyscope values {_SMOLLM2} --data {SMOLLM2_COUNTERFACT} --n 200 {_ENWIKI} --out figures/smollm2/values "
                  "--json figures/smollm2/values/values.json")
SMOLLM2_BOUNDS = (f"keyscope bounds {_SMOLLM2} --data {SMOLLM2_LLAMA2} --n 20 {_ENWIKI} --out figures/smollm2/bounds "
                  "--json figures/smollm2/bounds/bounds.json")
SMOLLM2_REACH = (f"keyscope reach {_SMOLLM2} --data {SMOLLM2_LLAMA2} --n 5 --scan-tokens 50000 --top-k 20 {_ENWIKI} "
                 "--out figures/smollm2/reach --json figures/smollm2/reach/reach.json")
SMOLLM2_MEMIT = (f"keyscope evaluate {_SMOLLM2} --data {SMOLLM2_LLAMA2} --known --n 10 --methods memit,memit+rep "
                 f"--protocol paper {_ENWIKI} --out figures/smollm2/memit --json figures/smollm2/memit/table1.json")


def smollm2_similarity(figures: Path) -> str:
    """Figure 3 on SmolLM2 (``smollm2/similarity/fig3_similarity.csv``), with factworld's medians beside it."""
    table = _similarity_table(figures, "smollm2/similarity/fig3_similarity.csv", SMOLLM2_SIMILARITY)
    subjects = {row["subject"] for row in read_csv(figures / "smollm2" / "similarity" / "fig3_similarity.csv")}
    table = f"{len(subjects)} subjects:\n\n" + table
    factworld = {kind: float(np.median(v)) for kind, v in similarity_strengths(figures / "fig3_similarity.csv").items()}
    return table + ("\nfactworld's medians, for comparison: rephrased " + f"{factworld[REPHRASE]:.3f}, token shuffles "
                    f"{factworld[SHUFFLE]:.3f}, word shuffles {factworld[SHUFFLE_WORDS]:.3f}, long contexts "
                    f"{factworld[LONG]:.3f}, another subject {factworld[RANDOM]:.3f} (`figures/fig3_similarity.csv`).\n")


def _similarity_table(figures: Path, name: str, command: str) -> str:
    """The normalised edit strength per perturbation kind of a Figure 3 CSV, and where it came from."""
    values = similarity_strengths(figures / name)
    labels = {REPHRASE: "rephrased subject", SHUFFLE: "shuffled subject tokens",
              SHUFFLE_WORDS: "shuffled subject words", LONG: "300-token unrelated context",
              RANDOM: "other subject (baseline)"}
    lines = ["| perturbation | n | median | q10 | q90 |", "|---|---:|---:|---:|---:|"]
    for kind, label in labels.items():
        if kind in values:
            v = np.asarray(values[kind])
            lines.append(f"| {label} | {len(v)} | {np.median(v):.3f} | {np.quantile(v, 0.1):.3f} | "
                         f"{np.quantile(v, 0.9):.3f} |")
    return "\n".join(lines) + f"\n\n(`figures/{name}`, from `{command}`)\n"


def scan(figures: Path, folder: str = "", command: str = REPRODUCE) -> str:
    """Figure 4 (``fig4_neighbors.csv``, :func:`neighbour_medians`)."""
    medians = neighbour_medians(figures, folder)
    return ("The median normalised edit strength of the subjects' 10 best *unrelated* corpus positions (pooled) is "
            + ", ".join(f"**{medians[name]:.3f}** under the {name} filter" for name in sorted(medians))
            + f" (`figures/{folder}fig4_neighbors.csv`, from `{command}`).\n")


def values(figures: Path, folder: str = "", command: str = REPRODUCE) -> str:
    """Figure 5 and ROME's quality (:func:`value_summary`)."""
    v = value_summary(figures, folder)
    return (f"Over {v['n']} ROME edits the median value norm at k* is {v['before']:.1f} before and "
            f"{v['after']:.1f} after (median ratio {v['ratio']:.2f}); success "
            f"**{percent(v['success'])}%**, locality **{percent(v['locality'])}%**, {v['seconds']:.2f} s per edit "
            f"(`figures/{folder}fig5_value_norms.csv`, from `{command}`).\n")


TABLE1_COLUMNS = ("success", "locality", "rephrase_id", "rephrase_ood", "rephrase_ood_new", "shuffle_id", "shuffle_ood",
                  "shuffle_ood_new", "shuffle_words_id", "shuffle_words_ood", "long_id", "long_ood", "long_ood_new")


def table1(figures: Path) -> str:
    """Table 1 (``table1.csv``): ROME, ROME+REP and their difference, in percent."""
    return _table1(figures, "", REPRODUCE)


SMOLLM2_TABLE1 = (f"torchrun --nproc_per_node 2 -m keyscope evaluate {_SMOLLM2} --data {SMOLLM2_LLAMA2} --known --n-facts 107 "
                  f"--methods rome,rome+rep --protocol paper {_ENWIKI} "
                  "--out figures/smollm2/table1 --json figures/smollm2/table1/table1.json --resume")
SMOLLM2_TAU_SWEEP = (f"keyscope evaluate {_SMOLLM2} --data {SMOLLM2_LLAMA2} --known --n 10 --methods rome+rep --protocol paper "
                     f"--tau-sweep 0.5,0.6,0.7,0.8,0.9,0.95 {_ENWIKI} --out figures/smollm2/tau_sweep "
                     "--json figures/smollm2/tau_sweep/table1.json")


def smollm2_table1(figures: Path) -> str:
    """Table 1 on SmolLM2 with the paper's protocol (``smollm2/table1/table1.csv``), and ROME+REP − ROME with its
    paired interval per column (:func:`_paired_deltas`)."""
    paired, parts = _paired_deltas(figures / "smollm2" / "table1", TABLE1_COLUMNS)
    run = json.loads((figures / "smollm2" / "table1" / "table1.json").read_text())
    per_fact = run["seconds"] / run["n"]
    return (_table1(figures, "smollm2/table1/", SMOLLM2_TABLE1)
            + f"\nROME+REP − ROME in points, with paired 95% intervals over the {paired} facts: " + "; ".join(parts) + ".\n"
            + f"\nThe run took {_duration(run['seconds'])} for {run['n']} facts ({per_fact:.0f} s a fact on two shared CPU "
              f"cores, both methods and every query, with two processes; `figures/smollm2/table1/table1.json`)"
            + (": every known fact of the file, within the 3 h keyscope aims at for this table on two cores.\n" if run["n"] >= run["n_known"] else
               f": all {run['n_known']} known facts of the file would take about "
               f"{run['n_known'] * per_fact / 3600:.1f} h at that pace — a projection, not a run.\n"))


def _duration(seconds: float) -> str:
    """``"1 h 12 min"`` or ``"30 min"``."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


#: The CounterFact schemas of the other SmolLM2 runs: (folder, label, fact file under ../shared/data).
SMOLLM2_SCHEMAS = (("counterfact", "CounterFact in its original schema", "counterfact/counterfact_orig_format_1400_patil.json"),
                   ("easyedit", "EasyEdit's CounterFact validation set", "counterfact/easyedit_counterfact-val.json"))


def smollm2_schemas(figures: Path) -> str:
    """ROME and ROME+REP on SmolLM2 over the CounterFact files of the original and EasyEdit schemas
    (``smollm2/{counterfact,easyedit}/``): success, locality and the paired differences of the columns they have."""
    from keyscope.studies.table1 import HEADERS

    lines = []
    for folder, label, data in SMOLLM2_SCHEMAS:
        by_method = _by(read_csv(figures / "smollm2" / folder / "table1.csv"), "method")
        rome = by_method["rome"]
        columns = [c for c in TABLE1_COLUMNS if c not in ("success", "locality") and int(rome[f"{c}_prompts"])]
        paired, parts = _paired_deltas(figures / "smollm2" / folder, ("success", "locality", *columns))
        command = (f"keyscope evaluate --model smollm2-135m --data ../shared/data/{data} --known --n 10 --methods "
                   f"rome,rome+rep --protocol paper --corpus ../shared/data/enwiki_extract --out figures/smollm2/{folder} "
                   f"--json figures/smollm2/{folder}/table1.json")
        lines.append(f"- {label}, {paired} known facts: ROME success {percent(_float(rome['success']))}%, locality "
                     f"{percent(_float(rome['locality']))}% (ROME+REP {percent(_float(by_method['rome+rep']['success']))}%, "
                     f"{percent(_float(by_method['rome+rep']['locality']))}%); ROME+REP − ROME: " + "; ".join(parts[2:])
                     + f" (`figures/smollm2/{folder}/table1.csv`, from `{command}`; columns without prompts left out: "
                     + ", ".join(HEADERS[c] for c in TABLE1_COLUMNS if c not in ("success", "locality", *columns))
                     + ")")
    return "\n".join(lines) + "\n"


def _paired_deltas(folder: Path, columns, base: str = "rome") -> tuple[int, list[str]]:
    """``(n, parts)``: ``base``+REP − ``base`` (ROME or MEMIT) of each of ``columns`` in points with its paired 95%
    cluster-bootstrap interval, recomputed from the per-fact rows of ``folder/table1_facts.csv``
    (:func:`keyscope.evaluation.evaluate.paired_bootstrap_interval`, seed 0) over the ``n`` facts both methods scored."""
    from keyscope.evaluation.evaluate import paired_bootstrap_interval
    from keyscope.studies.table1 import HEADERS

    by_fact: dict[str, dict[str, dict]] = {}
    for row in read_csv(folder / "table1_facts.csv"):
        by_fact.setdefault(row["case_id"], {})[row["method"]] = row
    gated = f"{base}+rep"
    paired = [f for f in by_fact.values() if base in f and gated in f]
    parts = []
    for column in columns:
        hits, totals, base_hits, base_totals = (
            np.array([float(f[method][f"{column}_{what}"]) for f in paired])
            for method, what in ((gated, "hits"), (gated, "total"), (base, "hits"), (base, "total")))
        difference = 100 * (hits.sum() / totals.sum() - base_hits.sum() / base_totals.sum())
        low, high = paired_bootstrap_interval(hits, totals, base_hits, base_totals)
        parts.append(f"{HEADERS[column]} {_signed(difference)} [{_signed(100 * low)}, {_signed(100 * high)}]")
    return len(paired), parts


def _table1(figures: Path, folder: str, command: str, base: str = "rome") -> str:
    """``base`` (ROME or MEMIT), ``base``+REP and their difference, in percent, of the ``table1.csv`` in
    ``figures/folder``."""
    from keyscope.studies.table1 import HEADERS

    by_method = _by(read_csv(figures / folder / "table1.csv"), "method")
    gated = f"{base}+rep"
    lines = ["| method | " + " | ".join(HEADERS[c] for c in TABLE1_COLUMNS) + " |", "|---|" + "---:|" * len(TABLE1_COLUMNS)]
    for method in (base, gated):
        lines.append(f"| {method.upper()} | " + " | ".join(percent(_float(by_method[method][c])) for c in TABLE1_COLUMNS) + " |")
    deltas = [100 * (float(by_method[gated][c]) - float(by_method[base][c])) for c in TABLE1_COLUMNS]
    lines.append("| difference | " + " | ".join(_signed(d) for d in deltas) + " |")
    counts = {c: by_method[base][f"{c}_prompts"] for c in TABLE1_COLUMNS}
    return ("\n".join(lines) + "\n\nPrompts per column: " + ", ".join(f"{HEADERS[c]} {counts[c]}" for c in TABLE1_COLUMNS)
            + f" (`figures/{folder}table1.csv`, intervals in `figures/{folder}table1.md`, from `{command}`).\n")


def tau_sweep(figures: Path, folder: str = "", command: str = REPRODUCE) -> str:
    """Figure 7 (:func:`tau_changes`): locality's, success's and the robustness columns' change."""
    high_tau, low_tau, change = tau_changes(figures, folder)
    gains = [v for m, v in change.items() if m not in ("success", "locality") and not np.isnan(v)]
    high, low = {"tau": high_tau}, {"tau": low_tau}
    return (f"Lowering τ from {float(high['tau']):g} to {float(low['tau']):g} changes locality by "
            f"{_signed(change['locality'])} points, success by {_signed(change['success'])}, and the robustness "
            f"columns by {_signed(min(gains))} to {_signed(max(gains))} (`figures/{folder}fig7_tau_sweep.csv`, from "
            f"`{command}`).\n")


def bounds(figures: Path, folder: str = "", command: str = REPRODUCE) -> str:
    """The lemmas (:func:`bounds_numbers`)."""
    b = bounds_numbers(figures, folder)

    def auc(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    parts = [f"{method}: {auc(a)} over {n} queries ({pos} successes)" for method, (a, pos, n) in b["lemma_4_6"].items()]
    neighbourhood, corpus = b["neighbourhood"], b["corpus"]
    return ("Lemma 4.6, AUROC of α at the subject's last token for a query's success — " + "; ".join(parts)
            + f". Lemma 4.7 (ROME), AUROC of α for a flipped top-1: neighbourhood prompts "
              f"{auc(neighbourhood[0])} ({neighbourhood[1]} flips of {neighbourhood[2]}), corpus-scan prefixes "
              f"{auc(corpus[0])} ({corpus[1]} flips of {corpus[2]}). Lemma 4.4: a single attention head carries "
              f"ε₁ + ε₂ in {percent(b['single_head_holds'])}% of {b['edits']} edits (the largest single-head gain, with "
              f"all its attention on the subject, is a median {100 * b['best_head_share']:.0f}% of ε₁ + ε₂), the "
              f"Cauchy–Schwarz bound on ‖Δv‖ holds in {percent(b['norm_bound_holds'])}% (`figures/{folder}bounds_*.csv`, "
              f"from `{command}`).\n")


def build(figures: Path) -> str:
    """The factworld builds (``factworld_build_seed*.json``): quality, edit layer and times per seed."""
    lines = ["| seed | edit layer | canonical | trained aliases | alias-only | shuffled words | long context | "
             "ROME success | ROME locality | training | build, in all |", "|---:" + "|---:" * 10 + "|"]
    for path in sorted(figures.glob("factworld_build_seed*.json")):
        card = json.loads(path.read_text())
        a, r = card["accuracy"], card["rome_check"]
        lines.append(f"| {card['train_config']['seed']} | {card['default_layer']} | {percent(a['canonical'], 2)}% | "
                     f"{percent(a['trained_aliases'], 2)}% | {percent(a['alias_only'], 2)}% | {percent(a['shuffled'], 2)}% | "
                     f"{percent(a['long_context'], 2)}% | {percent(r['success'])}% | {percent(r['locality'])}% | "
                     f"{card['train_seconds']:,.0f} s | {card['build_seconds']:,.0f} s |")
    return "\n".join(lines) + ("\n\n(`figures/factworld_build_seedS.json`, from `keyscope factworld train --seed S "
                               "--out DIR --json figures/factworld_build_seedS.json`)\n")


def trace(figures: Path) -> str:
    """The shipped model's causal trace (``factworld_build_seed0.json``)."""
    card = json.loads((figures / "factworld_build_seed0.json").read_text())
    t = card["trace"]
    return (f"Average indirect effect of each layer's MLP output at the subject's last token over {t['n']} known "
            f"facts, layers 0–{len(t['indirect_effect']) - 1}: "
            + " / ".join(f"{e:.3f}" for e in t["indirect_effect"])
            + f"; the largest is at layer {card['default_layer']} (`figures/factworld_build_seed0.json`).\n")


#: The Table 1 columns of the README's ablation table (the verdict reads every column).
ABLATION_COLUMNS = ("success", "locality", "rephrase_id", "rephrase_ood_new", "shuffle_id", "shuffle_ood_new",
                    "long_id", "long_ood_new")


def ablation(figures: Path) -> str:
    """The departures (``ablation.csv``): each variant's change against keyscope's setting, in points, with the
    paired 95% interval of the difference and :func:`keyscope.evaluation.ablation.verdict` of it where the CSV has the
    intervals (``METRIC_diff_lo``/``_hi``)."""
    from keyscope.evaluation.ablation import verdict
    from keyscope.evaluation.metrics import METRICS
    from keyscope.studies.table1 import HEADERS

    rows = read_csv(figures / "ablation.csv")
    base = _by(rows, "variant")["keyscope"]

    def interval(row: dict, column: str) -> tuple[float, float] | None:
        lo, hi = _float(row.get(f"{column}_diff_lo")), _float(row.get(f"{column}_diff_hi"))
        return None if lo is None else (lo, hi)

    paired = any(interval(row, c) is not None for row in rows for c in METRICS)

    def change(row: dict, column: str) -> str:
        cell = _signed(100 * (float(row[column]) - float(base[column])))
        ci = interval(row, column)
        return cell if ci is None else f"{cell} [{_signed(100 * ci[0])}, {_signed(100 * ci[1])}]"

    def judged(row: dict) -> str:
        if row["variant"] == "keyscope" or not any(interval(row, c) for c in METRICS):
            return ""
        v = verdict({c: interval(row, c) for c in METRICS})
        named = [f"{word} {', '.join(HEADERS[c] for c in v[word])}" for word in ("helps", "hurts") if v[word]]
        return v["verdict"] if v["verdict"] == "no measured effect" else ("trade-off: " if len(named) == 2 else "") + \
            "; ".join(named)

    lines = ["| variant | what it changes | " + " | ".join(HEADERS[c] for c in ABLATION_COLUMNS)
             + (" | the default's choice |" if paired else " |"),
             "|---|---|" + "---:|" * len(ABLATION_COLUMNS) + ("---|" if paired else "")]
    for row in rows:
        if row["variant"] == "keyscope":
            cells = [percent(_float(row[c])) for c in ABLATION_COLUMNS]
        else:
            cells = [change(row, c) for c in ABLATION_COLUMNS]
        lines.append(f"| {row['variant']} | {row['departure']} | " + " | ".join(cells)
                     + (f" | {judged(row)} |" if paired else " |"))
    return ("\n".join(lines) + "\n\nThe keyscope row is in percent, every other row in points against it"
            + (" with the paired 95% cluster-bootstrap interval of the difference; the last column reads those "
               "intervals (`keyscope.evaluation.ablation.verdict`: the default's choice helps a column when changing it alone lowers "
               "the column's whole interval below 0)" if paired else "")
            + " (`figures/ablation.csv`, intervals in `figures/ablation.md`, from `keyscope evaluate --ablate --n 50 "
            "--out figures --json figures/ablation.json`).\n")


def timing(figures: Path) -> str:
    """How long ``keyscope reproduce`` took (``reproduce_timings.json``)."""
    data = json.loads((figures / "reproduce_timings.json").read_text())
    seconds = data["seconds"]
    total = sum(seconds.values())
    return (f"On factworld it took {int(total // 60)} min {int(total % 60)} s on 2 CPU cores ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "; `figures/reproduce_timings.json`).\n")


def paper(figures: Path) -> str:
    """The paper's Table 1 deltas (:data:`keyscope.studies.table1.PAPER_DELTAS`, quoted from the paper)."""
    from keyscope.studies.table1 import PAPER_DELTAS as d

    def trio(domain: str) -> str:
        return " / ".join(_signed(d[f"{kind}_{domain}"]) for kind in (REPHRASE, SHUFFLE, LONG))

    return (f"The paper reports, for ROME+REP minus ROME on LLaMA-2-7B, {trio('id')} points for Rephrase / Shuffle / "
            f"Long in-domain, {trio('ood')} out-of-domain, and {_signed(d['success'])} / {_signed(d['locality'])} for "
            "Success / Locality (Yan et al., Table 1; the comparison is in `figures/REPORT.md`).\n")


def shape(figures: Path) -> str:
    """The shipped factworld model's tokenizer and accuracies (``factworld_info.json``)."""
    info = json.loads((figures / "factworld_info.json").read_text())
    tokens, accuracy = info["subject_tokens"], info["accuracy"]
    return (f"A canonical subject name takes a median of {tokens['median']:g} tokens, with "
            f"{percent(tokens['words_in_two_or_more_pieces'], 0)}% of name words cut into two or more pieces. Top-1 "
            "accuracy of the shipped model, measured now: " + ", ".join(f"{kind.replace('_', ' ')} {percent(v, 2)}%"
                                                                       for kind, v in accuracy.items())
            + " (`figures/factworld_info.json`, from `keyscope factworld info --json figures/factworld_info.json`).\n")


REACH = {"rome": ("reach_edits.csv", "reach_50.json",
                   "keyscope reach --n 50 --scan-tokens 50000 --top-k 20 --out figures --json figures/reach_50.json"),
         "rome+rep": ("reach_rep/reach_edits.csv", "reach_50_rep.json",
                      "keyscope reach --n 50 --methods rome+rep --scan-tokens 50000 --top-k 20 --out figures/reach_rep "
                      "--json figures/reach_50_rep.json")}


def reach(figures: Path) -> str:
    """``keyscope reach`` over many edits, per method of :data:`REACH` (``reach_edits.csv``: one row per edit;
    sizes and seconds from the run's JSON): for how many edits the top-K positions' median KL exceeds the random
    positions', and the medians over edits of both, of precision@K and of the Spearman correlation."""
    return "\n".join(_reach_summary(figures, table, summary, command, "factworld") for table, summary, command in REACH.values())


def _reach_summary(figures: Path, table: str, summary: str, command: str, model: str) -> str:
    """One ``keyscope reach --n`` run (:func:`reach`) of ``model``'s known facts."""
    rows = read_csv(figures / table)
    data = json.loads((figures / summary).read_text())
    top, rand = (np.array([float(r[k]) for r in rows]) for k in ("top_kl_median", "random_kl_median"))
    precision = np.array([float(r["precision_at_k"]) for r in rows])
    rho = np.array([v for v in (_float(r["spearman"]) for r in rows) if v is not None])
    changed = np.array([float(r["random_changed_fraction"]) for r in rows])
    k, n = data["top_k"], len(rows)
    return (
        f"{data['method'].upper()}, {n} edits of known {model} facts ({data['n_tokens']:,} corpus tokens "
        f"scanned per edit): the median KL of the top-{k} positions exceeds that of {k} random positions in "
        f"**{int((top > rand).sum())} of {n}** edits (medians over edits: {np.median(top):.2e} against "
        f"{np.median(rand):.2e} nats); median precision@{k} **{np.median(precision):.2f}** (random positions: "
        f"{np.median(changed):.2f} changed), median Spearman of s(k) with the KL **{np.median(rho):.2f}** "
        f"({n - rho.size} undefined); {data['cpu_seconds'] / 60:.1f} min of CPU time on one thread "
        f"(`OMP_NUM_THREADS=1`; {data['seconds'] / 60:.1f} min of wall-clock time on a shared machine) "
        f"(`figures/{table}`, `figures/{summary}`, from `{command}`).\n")


SEQUENTIAL = ("sequential/sequential.csv", "sequential/sequential50.json",
              "keyscope sequential --methods rome,rome+rep,memit,memit+rep --n 50 --checkpoints 10,20,30,40,50 "
              "--out figures/sequential --json figures/sequential/sequential50.json")


def sequential(figures: Path) -> str:
    """Sequential editing (``sequential.csv``: one row per method and checkpoint; the run's JSON for the undo
    check): retention, locality, the in-domain robustness of the earlier edits and REP's gate firing on other
    edits' subjects, per method, after each checkpoint's number of edits."""
    table, summary, command = SEQUENTIAL
    rows = read_csv(figures / table)
    data = json.loads((figures / summary).read_text())
    lines = ["| method | edits | retention | locality | Rephrase ID | Shuffle ID | Long ID | gate on another edit's subject |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        gate = _float(row["gate_other"])
        lines.append(f"| {row['method']} | {row['n_edits']} | " + " | ".join(
            percent(_float(row[c])) for c in ("retention", "locality", "rephrase_id", "shuffle_id", "long_id"))
            + f" | {'—' if gate is None else percent(gate)} |")
    restored = "restored bit-exactly" if data["weights_restored"] else "NOT restored"
    return ("\n".join(lines) + f"\n\nPercent; every `W_out` {restored} after the run (hashes compared); "
            f"{data['seconds'] / 60:.0f} min (`figures/{table}`, `figures/{summary}`, from `{command}`).\n")


MEMIT_BOUNDS = ("memit/bounds_memit50.json", "keyscope bounds --methods memit,memit+rep --n 50 --out figures/memit "
                "--json figures/memit/bounds_memit50.json")


def memit_bounds(figures: Path) -> str:
    """The lemma checks of MEMIT and MEMIT+REP (``keyscope bounds --methods memit,memit+rep``'s JSON)."""
    return _bounds_summary(figures, *MEMIT_BOUNDS, "memit", "MEMIT")


def _bounds_summary(figures: Path, summary: str, command: str, base: str, label: str) -> str:
    """The lemma checks of one ``keyscope bounds`` run (its JSON ``figures/summary``): Lemmas 4.6 and 4.7 per method,
    Lemma 4.4 of the ``base`` method (``rome`` or ``memit``, the edit ``label`` names)."""
    data = json.loads((figures / summary).read_text())
    l44 = data["lemma_4_4"]["methods"][base]

    def auc(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    parts = []
    for method, m in data["lemma_4_6"]["methods"].items():
        spec = data["lemma_4_7"]["methods"][method]
        parts.append(
            f"{method}: Lemma 4.6 AUROC {auc(m['auroc'])} over {m['n_queries']} queries ({m['positives']} successes; "
            f"α_max {auc(m['auroc_alpha_max'])}), value check (Pearson) {'n/a' if m['value_check_pearson'] is None else format(m['value_check_pearson'], '.3f')}; Lemma 4.7 "
            f"neighbourhood {auc(spec['neighbourhood']['auroc'])} ({spec['neighbourhood']['positives']} flips of "
            f"{spec['neighbourhood']['n_queries']}), corpus {auc(spec['corpus']['auroc'])} "
            f"({spec['corpus']['positives']} flips of {spec['corpus']['n_queries']})")
    layers = data["edit_layers"][base]
    where = f"layers {', '.join(map(str, layers))}" if len(layers) > 1 else f"layer {layers[0]}"
    return (f"{data['n']} facts edited one at a time by {label} at {where}: " + "; ".join(parts)
            + f". Lemma 4.4 (heads after layer {layers[-1]}): a single head carries ε₁ + ε₂ in "
              f"{percent(l44['holds_fraction'])}% of edits, the Cauchy–Schwarz bound on ‖Δv‖ holds in "
              f"{percent(l44['norm_bound_holds_fraction'])}% (`figures/{summary}`, from `{command}`).\n")


#: The fact files whose known subsets ``smollm2_known`` reports: (artefact, label, the file under ../shared/data).
SMOLLM2_KNOWN = (
    ("known_llama2_test.json", "REP's LLaMA-2 test set",
     "paraphrases/robustkeyedit_test.counterfact_para_prompt_para_subject_llama2-7b.json"),
    ("known_mistral_test.json", "REP's Mistral test set",
     "paraphrases/robustkeyedit_test.counterfact_para_prompt_para_subject_mistral.json"),
    ("known_qwen_test.json", "REP's Qwen test set",
     "paraphrases/robustkeyedit_test.counterfact_para_prompt_para_subject_qwen.json"),
    ("known_valid.json", "REP's validation set", "paraphrases/robustkeyedit_valid.counterfact_para_prompt_para_subject.json"),
    ("known_easyedit_val.json", "EasyEdit's CounterFact validation set", "counterfact/easyedit_counterfact-val.json"),
)


def smollm2_known(figures: Path) -> str:
    """How many facts of each fact file SmolLM2 knows (``figures/smollm2/known_*.json``, ``keyscope data --known``)."""
    lines = ["| fact file | records | known | share |", "|---|---:|---:|---:|"]
    for name, label, _ in SMOLLM2_KNOWN:
        report = json.loads((figures / "smollm2" / name).read_text())
        lines.append(f"| {label} | {report['records']} | {report['known']} | {percent(report['known'] / report['records'])}% |")
    command = "keyscope data ../shared/data/FILE --model smollm2-135m --known --json figures/smollm2/known_NAME.json"
    return "\n".join(lines) + f"\n\n(`figures/smollm2/known_*.json`, each from `{command}`)\n"


SMOLLM2_BOS = ("python benchmarks/bos_effect.py --model smollm2-135m --data ../shared/data/paraphrases/"
               "robustkeyedit_test.counterfact_para_prompt_para_subject_llama2-7b.json --json figures/smollm2/bos_effect.json")


def smollm2_bos(figures: Path) -> str:
    """What the bridge's BOS would have cost SmolLM2 (``figures/smollm2/bos_effect.json``)."""
    report = json.loads((figures / "smollm2" / "bos_effect.json").read_text())
    own, bos = report["own"], report["bos"]
    return (f"Read behind the bridge's BOS, SmolLM2 would know {bos['known']} of the {report['facts']} facts of REP's "
            f"LLaMA-2 test set instead of {own['known']}, and the mean probability of the true target's first token "
            f"would fall from {own['mean_true_probability']:.3f} to {bos['mean_true_probability']:.3f} "
            f"(`figures/smollm2/bos_effect.json`, from `{SMOLLM2_BOS}`).\n")


SMOLLM2_EDIT = ("keyscope edit --model smollm2-135m --case 0 --data "
                "../shared/data/counterfact/counterfact_orig_format_1400_patil.json --corpus ../shared/data/enwiki_extract "
                "--json figures/smollm2/edit_case0.json")


def smollm2_edit(figures: Path) -> str:
    """One ROME edit of SmolLM2 (``figures/smollm2/edit_case0.json``): the edit prompt and each probe kind."""
    report = json.loads((figures / "smollm2" / "edit_case0.json").read_text())
    probes = report["probes"]
    original = next(p for p in probes if p["kind"] == ORIGINAL)
    request = report["request"]

    def kind(name: str) -> list[dict]:
        return [p for p in probes if p["kind"] == name]

    def moved(group: list[dict]) -> str:
        top = sum(p["after"][0]["token"].strip() == request["target_new"].strip() for p in group)
        return f"{top} of {len(group)}"

    long = kind(LONG)
    text = (f"Case 0 ({request['subject']}: {request['target_true']} → {request['target_new']}) at layer {report['layer']}: "
            f"P({request['target_new']}) on the edit prompt {original['target_probability_before']:.3f} → "
            f"{original['target_probability_after']:.3f}; the new target is the top-1 after the edit on "
            f"{moved(kind(SHUFFLE))} token shuffles (largest s(k) {max(p['strength'] for p in kind(SHUFFLE)):.2f}), "
            f"{moved(kind(SHUFFLE_WORDS))} word shuffles")
    if long:
        text += (f" and {moved(long)} 300-token long contexts (s(k) {long[0]['strength']:.2f}, "
                 f"P {long[0]['target_probability_before']:.2f} → {long[0]['target_probability_after']:.2f})")
    seconds = report["seconds"]
    return text + (f"; the edit took {seconds['total']:.0f} s on one CPU thread, v* {seconds['v_star']:.0f} s of it "
                   f"(`figures/smollm2/edit_case0.json`, from `{SMOLLM2_EDIT}`).\n")


SMOLLM2_TRACE = ("keyscope trace --model smollm2-135m --data ../shared/data/counterfact/rome_known_1000.json --n 50 "
                 "--out figures/smollm2/trace --json figures/smollm2/trace/trace.json")


def smollm2_trace(figures: Path) -> str:
    """SmolLM2's causal trace (``figures/smollm2/trace/trace.json``) beside factworld's (``factworld_build_seed0.json``)
    and the paper's choice of layer."""
    report = json.loads((figures / "smollm2" / "trace" / "trace.json").read_text())
    mlp, attn = report["indirect_effect"]["mlp"], report["indirect_effect"]["attn"]
    factworld = json.loads((figures / "factworld_build_seed0.json").read_text())
    fw_mlp = factworld["trace"]["indirect_effect"]
    top3 = sorted(range(len(mlp)), key=lambda layer: -mlp[layer])[:3]
    return (f"Over {report['n']} facts of ROME's known-facts set that SmolLM2 knows, corrupting the subject's embeddings "
            f"(noise {report['noise_scale']:g}σ, {report['samples']} draws) moves P(true target) from "
            f"{report['p_clean']:.3f} to {report['p_corrupted']:.3f}; restoring one layer's MLP output at the subject's "
            f"last token recovers most at layers {', '.join(str(layer) for layer in top3)} (average indirect effect "
            f"{', '.join(f'{mlp[layer]:.3f}' for layer in top3)}; layer 5: {mlp[5]:.3f}; the attention output's largest "
            f"is {max(attn):.3f} at layer {attn.index(max(attn))}), of 30 layers: beyond layer 0 no layer recovers more "
            f"than {100 * max(mlp[1:]) / report['total_effect']:.0f}% of the total effect. factworld's peaks at layer "
            f"{factworld['default_layer']} of {len(fw_mlp)} ({max(fw_mlp):.3f}); the paper edits LLaMA-2-7B at layer 5 "
            f"of 32 (`figures/smollm2/trace/trace.json`, from `{SMOLLM2_TRACE}`; the curve: "
            f"[`trace.png`](figures/smollm2/trace/trace.png)).\n" + _smollm2_window_trace(figures))


SMOLLM2_TRACE_WINDOW = ("keyscope trace --model smollm2-135m --data ../shared/data/counterfact/rome_known_1000.json --n 20 "
                        "--window 10 --out figures/smollm2/trace_window10 --json figures/smollm2/trace_window10/trace.json")


def _smollm2_window_trace(figures: Path) -> str:
    """The window-10 trace of SmolLM2 (ROME's Figure 1 setting, ``figures/smollm2/trace_window10/trace.json``)."""
    report = json.loads((figures / "smollm2" / "trace_window10" / "trace.json").read_text())
    mlp = report["indirect_effect"]["mlp"]
    early = max(range(len(mlp)), key=lambda layer: mlp[layer])
    return (f"\nRestoring windows of {report['window']} layers around each layer (ROME's Figure 1) over {report['n']} known facts of "
            f"the same set, the MLP effect is a plateau over layers 0–5 ({min(mlp[:6]):.3f}–{max(mlp[:6]):.3f}, largest at "
            f"layer {early}) that halves by layer 6 ({mlp[6]:.3f}) and fades after layer 14 ({mlp[15]:.3f} at 15) "
            f"(`figures/smollm2/trace_window10/trace.json`, from `{SMOLLM2_TRACE_WINDOW}`).\n")


SMOLLM2_BENCH = ("python benchmarks/bench_rome_reference.py --model smollm2-135m --n 5 "
                 "--out figures/benchmarks/bench_rome_reference_smollm2.txt")


def smollm2_bench(figures: Path) -> str:
    """ROME on SmolLM2 against the dense transcription of kmeng01/rome (``bench_rome_reference_smollm2.txt``)."""
    text = (figures / "benchmarks" / "bench_rome_reference_smollm2.txt").read_text()
    rows = [line for line in text.splitlines() if "→" in line and not line.startswith("request")]
    cosines = [float(line.split()[-10]) for line in rows]  # the "ΔW cos ref" column
    differences = [float(line.split()[-9]) for line in rows]
    rates = [(float(line.split()[-2]), float(line.split()[-1])) for line in rows]  # v* tokens/s: keyscope, transcription
    median = re.search(r"median keyscope reference / transcription: ([\d.]+)×", text)[1]
    share = re.search(r"(\d+)% of the operators' self CPU time is not matmul", text)[1]
    load = re.findall(r"load average ([\d.]+)", text)
    return (f"One ROME edit of SmolLM2 at layer 5 in reference mode takes a median **{median}×** the time of the dense "
            f"transcription of kmeng01/rome over {len(rows)} requests, with the same ΔW (cosine ≥ {min(cosines):.6f}, "
            f"relative difference ≤ {max(differences):.1e}). It wins by running fewer positions per v* step (from each "
            f"prompt's subject's last token on, through the blocks above the edit), not by running each faster: "
            f"{float(np.median([k for k, _ in rates])):.0f} against {float(np.median([t for _, t in rates])):.0f} "
            f"tokens per second of v* (medians); {share}% of a v* step's operator time is not matmul "
            f"(one torch thread{'; load average ' + ' at the start, '.join(load) + ' at the end' if load else ''}; "
            f"`figures/benchmarks/bench_rome_reference_smollm2.txt`, from `{SMOLLM2_BENCH}`).\n")


def smollm2_scan(figures: Path) -> str:
    """Figure 4 on SmolLM2 (``smollm2/scan/``) and its subjects' rephrased forms, with factworld's beside them."""
    factworld = neighbour_medians(figures)
    return (scan(figures, "smollm2/scan/", SMOLLM2_SCAN) + "\nThe same subjects' rephrased forms: median "
            f"**{rephrase_median(figures, 'smollm2/scan/'):.3f}** (`figures/smollm2/scan/fig4_rephrase.csv`). "
            "factworld's, for comparison: "
            + ", ".join(f"{factworld[name]:.3f} under the {name} filter" for name in sorted(factworld))
            + f", rephrased forms {rephrase_median(figures):.3f} (`figures/fig4_neighbors.csv`, `figures/fig4_rephrase.csv`).\n")


def smollm2_values(figures: Path) -> str:
    """Figure 5 and ROME's quality on SmolLM2 (``smollm2/values/``), with factworld's beside it."""
    f = value_summary(figures)
    return (values(figures, "smollm2/values/", SMOLLM2_VALUES) + f"\nfactworld's, for comparison: {f['n']} edits, median "
            f"value norm {f['before']:.1f} before and {f['after']:.1f} after (ratio {f['ratio']:.2f}), success "
            f"{percent(f['success'])}%, locality {percent(f['locality'])}% (`figures/fig5_value_norms.csv`).\n")


def smollm2_tau_sweep(figures: Path) -> str:
    """Figure 7 on SmolLM2 (``smollm2/tau_sweep/fig7_tau_sweep.csv``): ROME+REP at each τ over 10 known facts."""
    n = json.loads((figures / "smollm2" / "tau_sweep" / "table1.json").read_text())["n"]
    return f"Over {n} known facts: " + tau_sweep(figures, "smollm2/tau_sweep/", SMOLLM2_TAU_SWEEP)


def smollm2_bounds(figures: Path) -> str:
    """The lemma checks on SmolLM2's edits (``smollm2/bounds/``)."""
    return bounds(figures, "smollm2/bounds/", SMOLLM2_BOUNDS)


def smollm2_reach(figures: Path) -> str:
    """``keyscope reach`` over a handful of SmolLM2's edits (``smollm2/reach/``)."""
    return _reach_summary(figures, "smollm2/reach/reach_edits.csv", "smollm2/reach/reach.json", SMOLLM2_REACH,
                          "SmolLM2")


def smollm2_memit(figures: Path) -> str:
    """MEMIT and MEMIT+REP on SmolLM2 with the paper's protocol (``smollm2/memit/``): the table and the paired
    differences."""
    paired, parts = _paired_deltas(figures / "smollm2" / "memit", TABLE1_COLUMNS, base="memit")
    return (_table1(figures, "smollm2/memit/", SMOLLM2_MEMIT, base="memit")
            + f"\nMEMIT+REP − MEMIT in points, with paired 95% intervals over the {paired} facts: " + "; ".join(parts)
            + ".\n")


MEMIT_BATCH10 = ("keyscope evaluate --methods memit,memit+rep --n 50 --batch-size 10 --out figures/memit "
                 "--json figures/memit/memit50.json")
MEMIT_BATCH1 = ("keyscope evaluate --methods memit,memit+rep --n 50 --batch-size 1 --out figures/memit/batch1 "
                "--json figures/memit/memit50_batch1.json")
MEMIT_GATES = "keyscope evaluate --methods memit+rep --n 50 --batch-size {b} --out figures/memit/gates{b} --json figures/memit/gates{b}.json"


def memit(figures: Path) -> str:
    """MEMIT and MEMIT+REP on factworld, ten facts per edit (``memit/``) and one (``memit/batch1/``), and MEMIT's
    speed against single ROME edits (``benchmarks/bench_memit.txt``, its JSON line)."""
    bench = json.loads((figures / "benchmarks" / "bench_memit.txt").read_text().strip().splitlines()[-1])
    return ("Ten facts per edit:\n\n" + _table1(figures, "memit/", MEMIT_BATCH10, base="memit")
            + "\nOne fact per edit:\n\n" + _table1(figures, "memit/batch1/", MEMIT_BATCH1, base="memit")
            + f"\nMEMIT writing {bench['n']} facts in one batch ran at {bench['ratio_rome_over_memit']:.2f}× the speed of "
              f"{bench['n']} single ROME edits ({bench['memit_seconds']:.0f} s against {bench['rome_seconds']:.0f} s on "
              f"{bench['threads']} shared CPU thread; each fact still needs its own target optimisation, "
              f"{bench['memit_mean_z_steps']:.1f} steps on average against ROME's {bench['rome_mean_v_steps']:.1f}; "
              f"MEMIT at layers {', '.join(map(str, bench['memit_layers']))}: `figures/benchmarks/bench_memit.txt`, from "
              f"`benchmarks/bench_memit.py --n {bench['n']}`).\n")


def memit_gates(figures: Path) -> str:
    """Where MEMIT+REP's gates fire in the passes that score Locality (``memit/gates10.json``, ten facts per edit;
    ``memit/gates1.json``, one): ``gate_counts`` and ``gate_*`` of :mod:`keyscope.evaluation.evaluate`."""
    runs = {b: json.loads((figures / "memit" / f"gates{b}.json").read_text())["methods"]["memit+rep"] for b in (10, 1)}
    ten, one = runs[10], runs[1]
    c10, c1 = ten["gate_counts"], one["gate_counts"]
    return (f"Ten facts per edit: another request's adaptor is on in {percent(c10['other'] / c10['prompts'])}% of the "
            f"{c10['prompts']} neighbourhood prompts (the fact's own adaptors in {percent(c10['own'] / c10['prompts'])}%); "
            f"a prompt whose top-1 changed has on average {ten['gate_adaptors_failed']:.1f} adaptors on, over "
            f"{percent(ten['gate_positions_failed'])}% of its positions, a kept one {ten['gate_adaptors_kept']:.1f} over "
            f"{percent(ten['gate_positions_kept'])}% (`figures/memit/gates10.json`, from `{MEMIT_GATES.format(b=10)}`). "
            f"One fact per edit: the fact's own adaptors are on in {percent(c1['own'] / c1['prompts'])}% of its "
            f"neighbourhood prompts; {c1['failed_on']} of the {c1['failed']} prompts whose top-1 changed had one on "
            f"({percent(c1['failed_on'] / c1['failed'])}%, against {percent(c1['kept_on'] / c1['kept'])}% of the kept "
            f"ones), Locality is {percent(one['locality_gate_on'])}% where some gate is on and "
            f"{percent(one['locality_gate_off'])}% where none is, and a changed prompt has "
            f"{one['gate_adaptors_failed']:.1f} adaptors on over {percent(one['gate_positions_failed'])}% of its positions, "
            f"a kept one {one['gate_adaptors_kept']:.1f} over {percent(one['gate_positions_kept'])}% "
            f"(`figures/memit/gates1.json`, from `{MEMIT_GATES.format(b=1)}`).\n")


def benchmarks(figures: Path) -> str:
    """The CPU benchmarks quoted in the docs: ROME's v* with the layers below the edit run once against the plain
    loop (``benchmarks/bench_v_star.txt``) and the covariance fit against the bare forward pass
    (``benchmarks/bench_gpu_small.txt``); each file's first line is the command that wrote it."""
    lines = (figures / "benchmarks" / "bench_v_star.txt").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    reuse = [r for r in rows if r[col["loop"]] == "reuse"]
    worst = max(float(r[col["max ‖Δv*‖/‖v*‖"]]) for r in rows)
    gpu = (figures / "benchmarks" / "bench_gpu_small.txt").read_text()
    fit = float(re.search(r"fit / bare sdpa: ([0-9.]+)", gpu)[1])
    command = lines[0].lstrip("# ").split("   ")[0]
    gpu_command = gpu.splitlines()[0].lstrip("# ").split("   ")[0]
    return ("ROME's v* with the layers below the edit run once is "
            + ", ".join(f"{r[col['speed-up']]} faster on {r[col['model']]} at layer {r[col['layer']]}" for r in reuse)
            + f", with the same v* to ≤ {worst:.1e} relative (`figures/benchmarks/bench_v_star.txt`, from `{command}`); "
              f"the covariance fit ran at {fit:.2f}× the bare SDPA pass (`figures/benchmarks/bench_gpu_small.txt`, from "
              f"`{gpu_command}`).\n")


def docs_check(figures: Path) -> str:
    """The last headless-browser check of the docs site (``docs_check.json``, ``benchmarks/check_docs.py``)."""
    run = json.loads((figures / "docs_check.json").read_text())
    return (f"{run['pages']} pages and {run['images']} images ({run['distinct_images']} distinct figures) opened in "
            f"{run['browser']}: {len(run['failures'])} failures (`figures/docs_check.json`, from `{run['command']}`).\n")


def side_by_side(figures: Path) -> str:
    """factworld, SmolLM2 and the paper side by side: Table 1's ROME+REP − ROME per column and the measures of
    Figures 3–5 and 7 and the lemmas (:func:`keyscope.studies.reproduce.deltas_table` and
    :func:`~keyscope.studies.reproduce.real_model_table`, the tables of ``REPORT.md``)."""
    from keyscope.studies import reproduce

    model = json.loads((figures / "reproduce_timings.json").read_text())["config"]["model"]
    deltas = reproduce.deltas_table(figures, model)
    measures = reproduce.real_model_table(figures, model)
    return ("\n".join(deltas + measures)
            + "\n(`figures/table1.csv`, `figures/smollm2/`; the paper's column quotes Yan et al. for LLaMA-2-7B: Table 1's "
              "deltas as numbers, the figures' claims in words)\n")


BLOCKS: dict[str, Callable[[Path], str]] = {
    "similarity": similarity, "scan": scan, "values": values, "table1": table1, "tau_sweep": tau_sweep,
    "bounds": bounds, "build": build, "trace": trace, "ablation": ablation, "timing": timing, "shape": shape,
    "paper": paper, "reach": reach, "sequential": sequential,
    "memit_bounds": memit_bounds, "smollm2_known": smollm2_known, "smollm2_edit": smollm2_edit,
    "smollm2_trace": smollm2_trace, "smollm2_similarity": smollm2_similarity,
    "smollm2_bos": smollm2_bos, "smollm2_table1": smollm2_table1,
    "smollm2_bench": smollm2_bench, "smollm2_schemas": smollm2_schemas, "smollm2_scan": smollm2_scan,
    "smollm2_values": smollm2_values, "smollm2_tau_sweep": smollm2_tau_sweep, "smollm2_bounds": smollm2_bounds,
    "smollm2_reach": smollm2_reach, "smollm2_memit": smollm2_memit, "side_by_side": side_by_side,
    "memit": memit, "memit_gates": memit_gates, "benchmarks": benchmarks,
    "docs_check": docs_check,
}


def render(name: str, figures: str | Path) -> str:
    return BLOCKS[name](Path(figures))


def blocks(text: str) -> dict[str, str]:
    """The blocks of a markdown text: ``{name: body}``."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def update(text: str, figures: str | Path, missing: list[str] | None = None) -> str:
    """``text`` with every block re-rendered from the artefacts in ``figures``. A block whose artefact does not
    exist raises :class:`FileNotFoundError`, unless ``missing`` is a list: then the block is left as it was and its
    name appended to ``missing``."""

    def sub(m: re.Match) -> str:
        try:
            body = render(m["name"], figures)
        except FileNotFoundError:
            if missing is None:
                raise
            missing.append(m["name"])
            return m[0]
        return f"<!-- keyscope:{m['name']} -->\n{body}<!-- /keyscope:{m['name']} -->"

    return BLOCK.sub(sub, text)


def markdown_files(paths) -> list[Path]:
    """The markdown files of ``paths``, in order: a file as it is, a folder as its ``*.md`` files, recursively and
    sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.md")) if path.is_dir() else [path]
    return files


def main(argv: list[str] | None = None) -> int:
    """``python -m keyscope.studies.readme FILE_OR_FOLDER… FIGURES``: rewrite every block of the files (a
    folder: its ``*.md`` files) from the artefacts in ``FIGURES``. Exit status 1 when some block's artefact is
    missing (that block is left as it was), 2 for a wrong command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m keyscope.studies.readme FILE_OR_FOLDER... FIGURES", file=sys.stderr)
        return 2
    *paths, figures_dir = argv
    status = 0
    for path in markdown_files(paths):
        missing: list[str] = []
        text = path.read_text()
        updated = update(text, figures_dir, missing)
        if updated != text:
            write_text(path, updated)
        if missing:
            print(f"{path}: not rendered, artefacts missing: {', '.join(missing)}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":  # python -m keyscope.studies.readme README.md docs figures
    sys.exit(main())
