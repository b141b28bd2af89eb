"""Sequential editing: ``N`` edits one after another, each computed on the model already edited by the ones before
(as a user edits a deployed model), with what is kept and what is broken measured at checkpoints.

The edits of one method come from its editor in :data:`keyscope.editing.base.EDITORS`; a batched editor (MEMIT)
writes ``edit_batch`` facts per edit. Each :class:`~keyscope.editing.base.ModelEdit` is entered into one
:class:`contextlib.ExitStack` as soon as it is computed, so every edit stays applied while later ones are
computed and measured, and all of them are undone on exit — weights restored bit-exactly and hooks removed, also
when something raises (the SHA-256 of every ``W_out`` before and after is compared and reported).

At each checkpoint ``n`` (after the first ``n`` edits), over the ``n`` facts edited so far, with the same
probes and scoring as :func:`keyscope.evaluation.evaluate.evaluate_fact` (:func:`keyscope.data.perturbations.fact_probes`,
:func:`keyscope.evaluation.evaluate.plan_queries`, :func:`keyscope.evaluation.evaluate.score_plan`), micro-averaged:

* ``retention`` — Success of all earlier edits (the edit prompt's new target still top-1);
* ``locality`` — each fact's neighbourhood prompts keep the **unedited** model's top-1 (scored once before
  any edit);
* the Rephrase / Shuffle / Shuffle-words / Long rates of earlier edits, in-domain and out-of-domain (the
  out-of-domain rates over all probes: near-twins are not separated here);
* ``gate_other`` (gated methods, REP) — how often an edit's gate fires on another edited fact's subject:
  over ordered pairs ``(e, f)`` of edited facts with different subjects, the fraction whose adaptor of ``e`` is
  on (:meth:`keyscope.editing.rep.KeyAdaptor.gate_on`: ``g > τ`` by default) at ``f``'s subject key in ``f``'s edit prompt (keys of the unedited model at the adaptor's
  layer, which ``W_out`` edits of that layer do not change).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace

import torch

from keyscope._infra.errors import EmptyCorpus, KeyscopeError
from keyscope.analysis.keys import collect_keys
from keyscope.analysis.predictions import sample_known_facts, score_targets
from keyscope.data.corpus import ContextSource
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import PerturbationConfig, fact_probes, subject_forms
from keyscope.editing.base import check_methods, make_editor, prepare_context
from keyscope.editing.request import EditRequest
from keyscope.evaluation import evaluate as ev
from keyscope.model.models import W_out, model_name, n_layers

__all__ = ["SequentialConfig", "SequentialResult", "run_sequential", "weights_digest", "CHECKPOINT_METRICS"]

#: The metrics of each checkpoint, in order (``retention`` is Table 1's ``success`` of the earlier edits).
CHECKPOINT_METRICS = ("retention", "locality", *(m for m in ev.METRICS if m.endswith(("_id", "_ood"))), "gate_other")


@dataclass(frozen=True)
class SequentialConfig:
    """``n`` facts edited in order (drawn with ``seed`` among the known ones), measured after the first
    ``checkpoints`` of them; ``edit_batch`` facts per edit for batched editors (1 for the others). No I/O."""

    n: int = 100
    checkpoints: tuple[int, ...] = (10, 50, 100)
    seed: int = 0
    edit_batch: int = 1
    batch_size: int = 32
    probes: PerturbationConfig = field(default_factory=PerturbationConfig)

    def __post_init__(self):
        checkpoints = tuple(sorted({int(c) for c in self.checkpoints}))
        if self.n < 1 or self.edit_batch < 1:
            raise KeyscopeError(f"n and the edit batch must be at least 1, not {self.n} and {self.edit_batch}")
        if not checkpoints or checkpoints[0] < 1 or checkpoints[-1] > self.n:
            raise KeyscopeError(f"checkpoints must lie in 1..{self.n} (the number of edits), not {list(self.checkpoints)}")
        object.__setattr__(self, "checkpoints", checkpoints)
        if self.probes.seed != self.seed:
            object.__setattr__(self, "probes", replace(self.probes, seed=self.seed))


@dataclass
class SequentialResult:
    """Per method the list of checkpoint entries (``{"n_edits", "retention", "locality", …, "seconds"}``)."""

    model: str
    layer: int
    config: SequentialConfig
    methods: dict[str, list[dict]]
    n_known: int
    skipped: list[dict] = field(default_factory=list)
    weights_restored: bool = True
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # the editors' configs (EditContext.settings)

    def as_json(self) -> dict:
        """``checkpoints`` is the first method's list (each entry with ``n_edits``, ``retention``, ``locality``, …);
        ``methods`` holds every method's."""
        first = next(iter(self.methods))
        return {"model": self.model, "layer": self.layer, "method": first, "checkpoints": self.methods[first],
                "methods": self.methods, "n_known": self.n_known, "config": asdict(self.config),
                "skipped": self.skipped, "weights_restored": self.weights_restored, "seconds": round(self.seconds, 1),
                **self.settings}


def weights_digest(model) -> list[str]:
    """SHA-256 of every layer's ``W_out`` bytes: equal digests mean bit-identical weights."""
    digests = []
    for layer in range(n_layers(model)):
        W = W_out(model, layer).detach().contiguous().cpu()  # (d_model, d_mlp)
        digests.append(hashlib.sha256(W.view(torch.uint8).numpy().tobytes()).hexdigest())
    return digests


@dataclass
class _Fact:
    fact: Fact
    request: EditRequest
    probes: object  # FactProbes
    plan: ev.QueryPlan
    unedited: tuple  # unedited top-1 tokens of the neighbourhood prompts


def _prepare_facts(model, facts: Sequence[Fact], config: SequentialConfig, context_docs: Iterable[str],
                   progress: bool) -> tuple[list[_Fact], list[dict], int]:
    from tqdm.auto import tqdm

    chosen, n_known = sample_known_facts(model, facts, len(facts), config.seed, batch_size=config.batch_size)
    forms = subject_forms(facts)
    contexts = ContextSource.of(context_docs)  # one for every fact: each long context has text of its own
    out, skipped = [], []
    bar = tqdm(total=config.n, desc="probes", disable=not progress)
    for fact in chosen:
        if len(out) == config.n:
            break
        try:
            probes = fact_probes(model.tokenizer, fact, contexts, config.probes, exclude=forms, other_facts=facts)
            plan = ev.plan_queries(model.tokenizer, probes, {}, 1.0)
            unedited = score_targets(model, [plan.sequences[r] for r in plan.locality],
                                     batch_size=config.batch_size).argmax
            request = EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true)
        except EmptyCorpus:  # the corpus, not the fact: no other fact would fare better
            raise
        except KeyscopeError as exc:
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
            continue
        out.append(_Fact(fact, request, probes, plan, unedited))
        bar.update()
    bar.close()
    if len(out) < config.n:
        raise KeyscopeError(f"only {len(out)} of the {config.n} facts asked for can be edited "
                            f"({n_known} known, {len(skipped)} skipped)")
    return out, skipped, n_known


def _gate_rate(gated: Sequence[tuple[int, object]], items: Sequence[_Fact], n: int, keys: dict) -> float | None:
    """``gate_other`` (module docstring) over the first ``n`` facts of ``items``: ``gated`` holds ``(fact index,
    REP)`` for every fitted adaptor; ``keys[layer]`` caches the unedited subject keys of all ``items`` at
    ``layer``, collected before the first edit."""
    fires = pairs = 0
    by_fact: dict[int, list] = {}
    for index, adaptor in gated:
        by_fact.setdefault(index, []).append(adaptor)
    for index, adaptors in by_fact.items():
        others = [j for j in range(n) if j != index
                  and items[j].fact.subject.strip() != items[index].fact.subject.strip()]
        if not others:
            continue
        on = torch.zeros(len(others), dtype=torch.bool)
        for adaptor in adaptors:
            gate = adaptor.gate(keys[adaptor.layer_][others])  # (n_others,)
            on |= adaptor.adaptor_.gate_on(gate, adaptor.config.tau).cpu()
        fires += int(on.sum())
        pairs += len(others)
    return fires / pairs if pairs else None


def _adaptors(edit, first_fact: int) -> list[tuple[int, object]]:
    """``(fact index, REP)`` of every adaptor of a gated edit (:meth:`~keyscope.editing.base.GatedEdit.request_adaptors`);
    none for an edit without a gate."""
    if not edit.gated:
        return []
    return [(first_fact + request, a) for request, a in edit.request_adaptors()]


def _measure(model, items: Sequence[_Fact], batch_size: int) -> dict:
    totals: dict[str, list[int]] = {}
    for item in items:
        for metric, (hits, total, _) in ev.score_plan(model, item.plan, item.unedited, batch_size).items():
            acc = totals.setdefault(metric, [0, 0])
            acc[0] += hits
            acc[1] += total
    out = {}
    for metric in CHECKPOINT_METRICS:
        source = "success" if metric == "retention" else metric
        if source in totals:
            hits, total = totals[source]
            out[metric] = hits / total if total else None
    return out


def run_method(model, items: Sequence[_Fact], method: str, context, config: SequentialConfig,
               progress: bool = True) -> list[dict]:
    """The checkpoint entries of ``method`` over ``items`` (module docstring); every edit undone on return."""
    from tqdm.auto import tqdm

    editor = make_editor(method, model, context)
    step = config.edit_batch if editor.batched else 1
    checkpoints = list(config.checkpoints)
    entries: list[dict] = []
    gated: list[tuple[int, object]] = []
    subject_keys: dict[int, torch.Tensor] = {}  # layer -> (n_facts, d_mlp) subject keys of the unedited model
    if editor.uses_gate_negatives:
        for layer in getattr(getattr(editor, "config", None), "layers", (context.layer,)):
            subject_keys[layer] = collect_keys(model, [i.fact.prompt for i in items], [i.fact.subject for i in items],
                                               layer, batch_size=config.batch_size)
    start = time.perf_counter()
    edit_seconds = 0.0
    done = 0
    bar = tqdm(total=checkpoints[-1], desc=f"sequential {method}", disable=not progress)
    with ExitStack() as stack:
        while done < checkpoints[-1]:
            upto = min(done + step, next(c for c in checkpoints if c > done))  # never step over a checkpoint
            batch = items[done:upto]
            tick = time.perf_counter()
            edit = editor.compute([i.request for i in batch], [i.probes for i in batch] if editor.uses_probes else None)
            stack.enter_context(edit.applied(model))
            edit_seconds += time.perf_counter() - tick
            gated += _adaptors(edit, done)
            done = upto
            bar.update(len(batch))
            if done in checkpoints:
                entry = {"n_edits": done, **_measure(model, items[:done], config.batch_size)}
                entry["gate_other"] = _gate_rate(gated, items, done, subject_keys) if editor.uses_gate_negatives else None
                entry["edit_seconds"] = round(edit_seconds, 2)
                entry["seconds"] = round(time.perf_counter() - start, 2)
                entries.append(entry)
    bar.close()
    return entries


def run_sequential(model, facts: Sequence[Fact], layer: int, cov, context_docs: Iterable[str],
                   methods: Sequence[str] = ("rome",), config: SequentialConfig | None = None, corpus=None,
                   load_covariance: Callable[[int], object] | None = None, rome_config=None, rep_config=None,
                   progress: bool = True) -> SequentialResult:
    """Edit ``config.n`` known facts one after another with each of ``methods`` (each method from the unedited
    model) and measure at ``config.checkpoints`` (module docstring). ``load_covariance(L)`` gives other layers'
    covariances (batch editors over a range of layers); ``corpus`` REP's corpus negatives."""
    methods = check_methods(methods)
    config = config or SequentialConfig()
    start = time.perf_counter()
    before = weights_digest(model)
    items, skipped, n_known = _prepare_facts(model, facts, config, context_docs, progress)
    context = prepare_context(model, layer, cov, methods, [i.fact for i in items], corpus,
                              {"rome": rome_config, "rep": rep_config},
                              seed=config.seed, batch_size=config.batch_size, load_covariance=load_covariance)
    results = {m: run_method(model, items, m, context, config, progress) for m in methods}
    restored = weights_digest(model) == before
    if not restored:
        raise KeyscopeError("the model's weights differ from before the sequential run (an edit was not undone)")
    return SequentialResult(model_name(model), layer, config, results, n_known, skipped, restored,
                            time.perf_counter() - start, context.settings())
