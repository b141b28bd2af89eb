"""Figure 5 and edit quality: ROME's installed values are "loud voices".

``run`` edits ``config.n`` counterfactual facts (:class:`ValuesConfig`) one at a time — each with
:func:`keyscope.editing.rome.compute_edit` and :func:`keyscope.editing.rome.applied`, so the model is restored bit-exactly before the next edit — and records:

* the **value norm at the edited key** before the edit, ``‖v‖ = ‖W k* + b‖`` (the unedited MLP output at
  ``k*``; ``b = 0`` for bias-free MLPs), and after it, ``‖v* + b‖`` (the rank-one update makes
  ``W' k* = v*`` exactly, ROME eq. 2), which is ``‖v*‖`` for bias-free MLPs. ROME's v* optimisation pushes
  ``‖v*‖`` far above the norms of ordinary values (up to ``clamp_norm_factor · ‖v‖`` away from them), the
  "loud voices" of Yan et al. ("Keys to Robust Edits", Figure 5);
* **Success** and **Locality** exactly as Table 1 defines them (:mod:`keyscope.evaluation.metrics`: every token of the
  new target teacher-forced top-1 on the edit prompt; each neighbourhood prompt keeps the unedited model's
  teacher-forced top-1 tokens), Locality pooled over all neighbourhood prompts;
* and, reported alongside, the success rate on the paraphrase prompts ("paraphrase") and on the prompt with
  each rephrased subject ("rephrase").

Facts are drawn (seeded) among those the unedited model **knows** — top-1 on the first token of
``target_true`` (:func:`keyscope.analysis.predictions.known_facts`), as in ROME and Yan et al. — and that have a
``target_new`` different from ``target_true``. The context prefixes are sampled once
(:func:`keyscope.editing.prefixes.context_prefixes`) and shared by every edit, as ROME caches them. Writes
``fig5_value_norms.png`` (:func:`keyscope.studies.plotting.fig5.value_norms`) and ``fig5_value_norms.csv`` (one row
per edit).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from keyscope._infra.atomic import save_figure
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.predictions import sample_known_facts, score_targets
from keyscope.data import perturbations
from keyscope.editing import rome
from keyscope.editing.base import make_editor, prepare_context
from keyscope.evaluation.evaluate import fact_request
from keyscope.evaluation.metrics import LOCALITY, SUCCESS, QueryPlan, score_plan
from keyscope.model.models import b_out, model_name
from keyscope.studies.plotting import fig5
from keyscope.studies.tables import write_csv

FIGURE = "fig5_value_norms.png"
TABLE = "fig5_value_norms.csv"


def _stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"n": 0}
    return {"n": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
            "q10": float(np.quantile(values, 0.1)), "q90": float(np.quantile(values, 0.9))}


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


@dataclass
class ValuesResult:
    """Per-edit rows, the pooled quality numbers and value-norm statistics, and the files written."""

    model: str
    layer: int
    rows: list[dict] = field(repr=False)
    summary: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    config: rome.ROMEConfig | None = None
    files: list[Path] = field(default_factory=list)
    figures: dict = field(default_factory=dict, repr=False)  # name -> matplotlib Figure

    def as_json(self) -> dict:
        return {**self.summary, "model": self.model, "layer": self.layer, "skipped": self.skipped,
                "rome_config": asdict(self.config) if self.config is not None else None,
                "files": [str(p) for p in self.files]}


#: What is scored per edit (:mod:`keyscope.evaluation.metrics`): Success, Locality, and success on the paraphrase prompts
#: and on the prompt with each rephrased subject.
SCORED = (SUCCESS, LOCALITY, "paraphrase", "rephrase")


def _plan(tokenizer, fact) -> QueryPlan:
    """One fact's queries (:class:`keyscope.evaluation.metrics.QueryPlan`): the edit prompt, the paraphrase prompts, the
    prompt with each rephrased subject, and the neighbourhood prompts."""
    plan = QueryPlan()
    plan.query(tokenizer, fact, [SUCCESS], fact.filled_prompt)
    for prompt in fact.paraphrase_prompts:
        plan.query(tokenizer, fact, ["paraphrase"], prompt)
    rephrased = perturbations.fact_probes(tokenizer, fact, None, perturbations.REPHRASES).perturbed[perturbations.REPHRASE][0]
    for probe in rephrased:
        plan.query(tokenizer, fact, ["rephrase"], probe.prompt)
    plan.neighbourhood(tokenizer, fact)
    return plan


@dataclass(frozen=True)
class ValuesConfig:
    """What the Figure 5 study edits and measures. No I/O.

    ``layer``: the edited layer; ``n``: known facts edited, drawn with ``seed``; ``rome_config``: ROME's
    hyper-parameters (default: :meth:`keyscope.editing.rome.ROMEConfig.for_model`); ``batch_size``: prompts per
    forward pass."""

    layer: int
    n: int = 100
    seed: int = 0
    rome_config: rome.ROMEConfig | None = None
    batch_size: int = 64


def run(model, facts, config: ValuesConfig, *, cov, out_dir: str | Path | None = None,
        progress: bool = True) -> ValuesResult:
    """Edit ``config.n`` known facts of ``facts`` one at a time at ``config.layer`` (covariance ``cov``), measure
    quality and value norms (module docstring) and write the figure and CSV into ``out_dir`` (nothing for
    ``None``)."""
    from tqdm.auto import tqdm

    layer, n, seed, batch_size = config.layer, config.n, config.seed, config.batch_size
    rome_config = config.rome_config or rome.ROMEConfig.for_model(model)
    tokenizer = model.tokenizer
    chosen, n_known = sample_known_facts(model, facts, n, seed, batch_size)
    start = time.perf_counter()
    context = prepare_context(model, layer, cov, ("rome",), configs={"rome": rome_config}, batch_size=batch_size)
    seconds_prefixes = time.perf_counter() - start
    editor = make_editor("rome", model, context)
    bias = b_out(model, layer)

    rows, skipped = [], []
    for fact in tqdm(chosen, desc="ROME edits", disable=not progress):
        try:
            plan = _plan(tokenizer, fact)
            unedited = score_targets(model, [plan.sequences[r] for r in plan.locality], batch_size=batch_size).argmax
            start = time.perf_counter()
            edits = editor.compute([fact_request(fact)])
        except KeyscopeError as exc:  # e.g. a target that does not tokenise on its own after a prompt
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
            continue
        seconds = time.perf_counter() - start
        edit = edits.edits[0]
        value_after = edit.v_star + (bias.float().to(edit.v_star.device) if bias is not None else 0.0)  # (d_model,)
        with edits.applied(model):
            scores = score_plan(model, plan, unedited, batch_size, SCORED)
        trace = edit.trace
        rows.append({
            "case_id": fact.case_id, "subject": fact.subject, "target_true": fact.target_true,
            "target_new": fact.target_new, "success": bool(scores[SUCCESS][0]),
            "neighbourhood_unchanged": scores[LOCALITY][0], "neighbourhood": scores[LOCALITY][1],
            "paraphrase_hits": scores["paraphrase"][0], "paraphrases": scores["paraphrase"][1],
            "rephrase_hits": scores["rephrase"][0], "rephrases": scores["rephrase"][1],
            "value_norm_before": trace.value_norm, "value_norm_after": float(value_after.norm()),
            "delta_norm": trace.delta_norm, "max_delta_norm": trace.max_delta_norm, "steps": trace.n_steps,
            "target_probability": trace.target_probability[-1], "seconds": seconds,
            "seconds_k_star": trace.seconds_k_star, "seconds_v_star": trace.seconds_v_star,
            "seconds_update": trace.seconds_update,
        })
    if not rows:
        raise KeyscopeError(f"every one of the {len(chosen)} edits failed; first: {skipped[0]['reason']}")

    def pooled(hits: str, total: str) -> float | None:
        return _rate(sum(r[hits] for r in rows), sum(r[total] for r in rows))

    before_norms = [r["value_norm_before"] for r in rows]
    after_norms = [r["value_norm_after"] for r in rows]
    summary = {
        "n": len(rows),
        "success": sum(r["success"] for r in rows) / len(rows),
        "locality": pooled("neighbourhood_unchanged", "neighbourhood"),
        "seconds_per_edit": float(np.mean([r["seconds"] for r in rows])),
        "paraphrase": pooled("paraphrase_hits", "paraphrases"),
        "rephrase": pooled("rephrase_hits", "rephrases"),
        "n_known": n_known,
        "seconds_prefixes": seconds_prefixes,
        "value_norms": {"before": _stats(before_norms), "after": _stats(after_norms),
                        "ratio": _stats(np.asarray(after_norms) / np.asarray(before_norms))},
    }

    name = model_name(model)
    if out_dir is None:
        return ValuesResult(name, layer, rows, summary, skipped, rome_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = fig5.value_norms(before_norms, after_norms,
                              title=f"{name}, layer {layer}: value norm at k* over {len(rows)} ROME edits")
    figure_path, table_path = out / FIGURE, out / TABLE
    save_figure(figure, figure_path, dpi=150)
    write_csv(table_path, rows)
    return ValuesResult(name, layer, rows, summary, skipped, rome_config, [figure_path, table_path], {"value_norms": figure})


def format_summary(result: ValuesResult, timings: bool = True) -> str:
    """The quality numbers and value-norm medians as text (``timings=False``: without the seconds, as a notebook
    shows it)."""
    s = result.summary

    def pct(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    norms = s["value_norms"]
    lines = [
        f"{result.model}, layer {result.layer}: {s['n']} edits of known facts ({s['n_known']} known"
        + (f", {len(result.skipped)} skipped" if result.skipped else "") + ")",
        f"success (new target top-1)      {pct(s['success'])}",
        f"locality (neighbours unchanged) {pct(s['locality'])}",
        f"paraphrase (new target top-1)   {pct(s['paraphrase'])}",
        f"rephrased subject (new top-1)   {pct(s['rephrase'])}",
        *([f"seconds per edit                {s['seconds_per_edit']:.3f} (prefixes sampled once: "
           f"{s['seconds_prefixes']:.3f} s)"] if timings else []),
        f"median |v| before {norms['before']['median']:.3f}, after {norms['after']['median']:.3f} "
        f"(median ratio {norms['ratio']['median']:.2f})",
    ]
    return "\n".join(lines)
