"""``keyscope reach``: an edit's reach shown before it is applied, then checked (:mod:`keyscope.evaluation.reach`).

``run`` computes the edit of one request with any method of :data:`keyscope.editing.base.EDITORS` (ROME+REP fits
its adaptor on the fact's in-domain probes, :func:`keyscope.data.perturbations.fact_probes`, or — for a request
that is no fact of the data — on the probes ``keyscope edit`` shows), scores the subject's perturbed forms
(the probes of ``keyscope edit``, :func:`keyscope.studies.edit.build_probes`) and every position of the
corpus by the edit's strength, lists the ``top_k`` unrelated positions and the verdict, then measures the
real change at those positions against as many random ones and writes ``reach.png``
(:func:`keyscope.studies.plotting.reach.reach_figure`).

``run_many`` does the same for ``n`` known facts drawn with ``seed`` (no figure per edit) and summarises the
distribution over edits: for how many the median KL of the top positions exceeds that of the random ones,
and the medians of precision@K and of the Spearman correlation; it writes ``reach_edits.csv`` (one row per
edit) and ``reach_edits.png``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keyscope._infra.atomic import save_figure
from keyscope._infra.errors import EmptyCorpus, KeyscopeError
from keyscope.data.corpus import ContextSource
from keyscope.data.perturbations import (
    ORIGINAL,
    PerturbationConfig,
    fact_probes,
    rephrase_kinds,
    subject_forms,
)
from keyscope.data.prompts import fill
from keyscope.editing.base import make_editor, prepare_context
from keyscope.editing.rep import REPConfig
from keyscope.editing.request import EditRequest
from keyscope.editing.rome import ROMEConfig
from keyscope.evaluation import reach
from keyscope.model.models import model_name
from keyscope.studies.edit import ProbeConfig, build_probes, edit_probes
from keyscope.studies.plotting.reach import reach_edits_figure, reach_figure
from keyscope.studies.tables import write_csv

FIGURE = "reach.png"
EDITS_FIGURE = "reach_edits.png"
EDITS_TABLE = "reach_edits.csv"


@dataclass
class ReachReport:
    """One edit's reach: the request, the analysis with its check, the seconds of each stage, the files."""

    model: str
    layer: int
    method: str
    request: EditRequest
    case_id: object
    result: reach.Reach = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    figure: object = field(default=None, repr=False)
    settings: dict = field(default_factory=dict)  # the editors' configs (EditContext.settings)

    def as_json(self) -> dict:
        request = self.request
        return {"model": self.model, "layer": self.layer, "method": self.method, "case_id": self.case_id,
                "request": {"prompt": request.template, "subject": request.subject, "target_new": request.target_new,
                            "target_true": request.target_true},
                **self.result.as_json(), "seconds": dict(self.seconds), "files": [str(f) for f in self.files],
                **self.settings}


@dataclass(frozen=True)
class ReacherConfig:
    """What a :class:`Reacher` edits and how it shows and checks the reach. No I/O.

    ``layer``: the edited layer (the scanned keys'); ``method``: the editor (:data:`keyscope.editing.base.EDITORS`);
    ``reach``: what is scanned and checked (:class:`keyscope.evaluation.reach.ReachConfig`; its ``seed`` also draws
    the facts of :func:`run_many` and a method's training probes); ``probes``: the subject's forms shown
    (default: :func:`keyscope.studies.edit.edit_probes` with the reach's seed); ``rome_config``/``rep_config``:
    the editors' hyper-parameters (default: each editor's own)."""

    layer: int
    method: str = "rome"
    reach: reach.ReachConfig = field(default_factory=reach.ReachConfig)
    probes: ProbeConfig | None = None
    rome_config: ROMEConfig | None = None
    rep_config: REPConfig | None = None


class Reacher:
    """The editor and the probe settings of a run (:class:`ReacherConfig`), shared by every request it is asked
    about: ``cov`` is the layer's key covariance, ``corpus`` the corpus scanned (a name or path,
    :mod:`keyscope.data.corpus`), ``facts`` the data (a method that fits on probes gets a fact's; the subjects'
    forms no shuffle may spell), ``context_docs`` the text of the long contexts; ``load_covariance(L)`` gives the key
    covariance of another layer, for editors that edit several (MEMIT)."""

    def __init__(self, model, config: ReacherConfig, *, cov, corpus, facts: Sequence = (), context_docs=None,
                 load_covariance=None):
        self.model, self.layer, self.source, self.method = model, config.layer, corpus, config.method
        self.facts = tuple(facts)
        self.config = config.reach
        self.probe_config = config.probes or ProbeConfig(edit_probes(seed=self.config.seed))
        self.context_docs = ContextSource.of(context_docs)  # every request's long contexts: text of their own
        self.forms = subject_forms(self.facts)  # a shuffle that spells another subject's name is no shuffle
        context = prepare_context(model, self.layer, cov, (self.method,), self.facts, corpus,
                                  {"rome": config.rome_config, "rep": config.rep_config}, seed=self.config.seed,
                                  load_covariance=load_covariance)
        self.editor = make_editor(self.method, model, context)
        self.settings = context.settings()  # the editors' configs, for the JSON

    def probes(self, request: EditRequest, fact=None) -> list:
        """The subject's forms shown beside the corpus (``keyscope edit``'s probes, the edit prompt first)."""
        own = fact is not None and fact.subject == request.subject
        return build_probes(self.model.tokenizer, request, fact.subject_rephrase if own else (), self.context_docs,
                            self.probe_config, max_positions=getattr(self.model.cfg, "n_ctx", None),
                            rephrase_kinds=rephrase_kinds(fact) if own else None, exclude=self.forms)

    def compute(self, request: EditRequest, fact=None, shown: Sequence = ()):
        """The edit of ``request``; a method that fits on probes gets the fact's in-domain probes (or, without
        a fact, the ``shown`` forms other than the edit prompt)."""
        if not self.editor.uses_probes:
            return self.editor.compute([request])
        if fact is not None and fact.subject == request.subject:
            training = fact_probes(self.model.tokenizer, fact, self.context_docs,
                                   PerturbationConfig(seed=self.config.seed), exclude=self.forms,
                                   other_facts=self.facts)
        else:
            training = [p for p in shown if p.kind != ORIGINAL]
        return self.editor.compute([request], [training])

    def run(self, request: EditRequest, fact=None, progress: bool = True) -> ReachReport:
        """Edit, analyse and check one request (module docstring); the weights are unchanged on return."""
        tokenizer = self.model.tokenizer
        start = time.perf_counter()
        shown = self.probes(request, fact)
        edit = self.compute(request, fact, shown)
        seconds = {"edit": time.perf_counter() - start}
        own = fact is not None and fact.subject == request.subject
        variants = reach.subject_variants(tokenizer, request, fact if own else None)
        result = reach.analyse(self.model, edit, self.source, shown, variants, self.config, progress=progress)
        result.check = reach.check(self.model, edit, self.source, result, variants, self.config)
        seconds.update(result.seconds, check=result.check.seconds)
        seconds["total"] = time.perf_counter() - start
        return ReachReport(model_name(self.model), self.layer, self.method, request,
                           fact.case_id if fact is not None else None, result, seconds, settings=self.settings)


def figure_of(report: ReachReport):
    """``reach.png`` of one report."""
    check = report.result.check
    request = report.request
    return reach_figure(
        [r.strength for r in check.top], [r.kl for r in check.top], [r.changed for r in check.top],
        [r.strength for r in check.random], [r.kl for r in check.random], [r.changed for r in check.random],
        check.kl_threshold, [f.strength for f in report.result.missed],
        title=(f"{report.model}, layer {report.layer}, {report.method}: {request.subject!r} -> "
               f"{request.target_new!r}\nprecision@{len(check.top)} {check.precision_at_k:.2f}, "
               f"Spearman {_fmt(check.spearman)}"))


def run(reacher: Reacher, request: EditRequest, *, out_dir: str | Path, fact=None, progress: bool = True) -> ReachReport:
    """:meth:`Reacher.run` (``fact``: the fact of the data ``request`` edits, if any) and ``reach.png`` in
    ``out_dir``."""
    report = reacher.run(request, fact, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.figure = figure_of(report)
    path = out / FIGURE
    save_figure(report.figure, path, dpi=150)
    report.files.append(path)
    return report


# ---------------------------------------------------------------------------------------------- many edits


def _median(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def edit_row(report: ReachReport) -> dict:
    """One edit's numbers (a row of ``reach_edits.csv``)."""
    result, check = report.result, report.result.check
    return {"case_id": report.case_id, "subject": report.request.subject, "n_top": len(check.top),
            "top_strength_median": _median([r.strength for r in check.top]),
            "random_strength_median": _median([r.strength for r in check.random]),
            "top_kl_median": check.top_kl_median, "random_kl_median": check.random_kl_median,
            "kl_threshold": check.kl_threshold, "precision_at_k": check.precision_at_k, "spearman": check.spearman,
            "top_flip_rate": check.top_flip_rate, "random_flip_rate": check.random_flip_rate,
            "random_changed_fraction": check.random_changed_fraction,
            "reference_strength": result.reference, "n_above_reference": result.n_above_reference,
            "n_unrelated": result.n_tokens - result.n_excluded, "seconds": report.seconds["total"]}


def summarize(rows: Sequence[dict]) -> dict:
    """The distribution over edits: how many have a top-K KL median above the random one, and the medians."""
    above = sum(1 for r in rows if r["top_kl_median"] > r["random_kl_median"])
    return {"n": len(rows), "n_top_above_random": above,
            "median_top_kl_median": _median([r["top_kl_median"] for r in rows]),
            "median_random_kl_median": _median([r["random_kl_median"] for r in rows]),
            "median_precision_at_k": _median([r["precision_at_k"] for r in rows]),
            "median_spearman": _median([r["spearman"] for r in rows]),
            "n_spearman_undefined": sum(1 for r in rows if r["spearman"] is None),
            "median_random_changed_fraction": _median([r["random_changed_fraction"] for r in rows]),
            "median_top_flip_rate": _median([r["top_flip_rate"] for r in rows]),
            "median_random_flip_rate": _median([r["random_flip_rate"] for r in rows]),
            "median_seconds_per_edit": _median([r["seconds"] for r in rows])}


@dataclass
class ManyReport:
    model: str
    layer: int
    method: str
    config: reach.ReachConfig
    rows: list[dict]
    summary: dict
    skipped: list[dict]
    n_known: int
    seconds: float
    cpu_seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    figure: object = field(default=None, repr=False)
    settings: dict = field(default_factory=dict)  # the editors' configs (EditContext.settings)

    def as_json(self) -> dict:
        c = self.config
        return {"model": self.model, "layer": self.layer, "method": self.method, "n_tokens": c.n_tokens,
                "top_k": c.top_k, "seed": c.seed, "changed_quantile": c.changed_quantile, "n_known": self.n_known,
                "summary": self.summary, "edits": self.rows, "skipped": self.skipped,
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "files": [str(f) for f in self.files], **self.settings}


def run_many(reacher: Reacher, n: int, *, out_dir: str | Path, progress: bool = True) -> ManyReport:
    """:meth:`Reacher.run` for ``n`` known facts of ``reacher.facts`` drawn with the config's seed; a fact whose
    edit raises a :class:`~keyscope._infra.errors.KeyscopeError` is skipped with its reason."""
    from tqdm.auto import tqdm

    from keyscope.analysis.predictions import sample_known_facts

    start, cpu_start = time.perf_counter(), time.process_time()
    chosen, n_known = sample_known_facts(reacher.model, reacher.facts, n, reacher.config.seed)
    rows, skipped = [], []
    for fact in tqdm(chosen, desc="reach of edits", disable=not progress):
        try:
            request = EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true)
            rows.append(edit_row(reacher.run(request, fact, progress=False)))
        except EmptyCorpus:  # the corpus, not the fact: no other fact would fare better
            raise
        except KeyscopeError as exc:
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
    if not rows:
        raise KeyscopeError(f"no fact could be edited ({len(skipped)} skipped)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, figure_path = out / EDITS_TABLE, out / EDITS_FIGURE
    write_csv(table, rows)
    summary = summarize(rows)
    figure = reach_edits_figure([r["top_kl_median"] for r in rows], [r["random_kl_median"] for r in rows],
                                title=(f"{model_name(reacher.model)}, layer {reacher.layer}, {reacher.method}: "
                                       f"{summary['n_top_above_random']} of {len(rows)} edits\nchange their top-"
                                       f"{reacher.config.top_k} positions more than random ones"))
    save_figure(figure, figure_path, dpi=150)
    return ManyReport(model_name(reacher.model), reacher.layer, reacher.method, reacher.config, rows, summary,
                      skipped, n_known, time.perf_counter() - start, time.process_time() - cpu_start,
                      [table, figure_path], figure, reacher.settings)


# ---------------------------------------------------------------------------------------------- text


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _shown(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def format_report(report: ReachReport, timings: bool = True) -> str:
    """The report as text: the request, the top positions with their measured change, the subject's forms,
    the verdict and the check (``timings=False``: without the seconds of each stage, as a notebook shows it)."""
    result, check, request = report.result, report.result.check, report.request
    t = report.seconds
    lines = [
        f"{report.model}, layer {report.layer}, {report.method}: {fill(request.template, request.subject).text!r} -> "
        f"{request.target_new!r}" + (f" (case {report.case_id})" if report.case_id is not None else ""),
        f"scanned {result.n_tokens:,} corpus tokens ({result.n_excluded:,} masked as the subject or related)"
        + (f"; edit {t['edit']:.2f} s, forms {t['forms']:.2f} s, scan {t['scan']:.2f} s, check {t['check']:.2f} s, "
           f"total {t['total']:.2f} s" if timings else ""),
        f"top {len(check.top)} unrelated positions by s(k) (KL = KL(unedited || edited) of the next token):",
        f"{'rank':>4} {'s(k)':>7} {'KL':>9} flip  prefix",
    ]
    for rank, r in enumerate(check.top):
        lines.append(f"{rank:>4} {r.strength:7.3f} {r.kl:9.2e} {'yes ' if r.flipped else 'no  '}  {_shown(r.prefix)}")
    if result.original is not None:
        lines.append(f"the edit prompt itself: s(k) = {result.original.strength:.3f}")
    lines.append("the subject's own forms (what the edit reaches of them; low s(k) = missed):")
    for form in result.missed:
        lines.append(f"  [{form.kind}] s(k) = {form.strength:.3f}  {_shown(form.subject if form.kind != 'long' else form.prompt)}")
    lines.append(f"verdict: {result.verdict}")
    lines.append(
        f"check: precision@{len(check.top)} {check.precision_at_k:.2f} (random positions: "
        f"{check.random_changed_fraction:.2f} changed), Spearman(s, KL) {_fmt(check.spearman)}, median KL top "
        f"{check.top_kl_median:.2e} vs random {check.random_kl_median:.2e}; changed = KL > {check.kl_threshold:.2e} "
        f"(the random positions' {check.changed_quantile:g} quantile) or a top-1 flip")
    return "\n".join(lines)


def format_many(report: ManyReport) -> str:
    s = report.summary
    return (f"{report.model}, layer {report.layer}, {report.method}: {s['n']} edits ({len(report.skipped)} skipped), "
            f"{report.config.n_tokens:,} corpus tokens, top {report.config.top_k}\n"
            f"top-{report.config.top_k} KL median above the random positions' in {s['n_top_above_random']} of {s['n']} "
            f"edits (medians over edits: top {_fmt(s['median_top_kl_median'], '.2e')}, random "
            f"{_fmt(s['median_random_kl_median'], '.2e')}); median precision@{report.config.top_k} "
            f"{_fmt(s['median_precision_at_k'], '.2f')}, median Spearman {_fmt(s['median_spearman'], '.2f')}; "
            f"{report.seconds:.0f} s ({report.cpu_seconds:.0f} s of CPU)")
