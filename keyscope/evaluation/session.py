"""One call that edits facts and scores them, in the spirit of EasyEdit's ``BaseEditor.edit(...)``
(zjunlp/EasyEdit, ``easyeditor/editors/editor.py``: prompts, subjects, targets in; metrics and the edited model out).

:func:`edit` takes a model (a TransformerLens 4 bridge or a Hugging Face ``PreTrainedModel``,
:func:`keyscope.model.models.as_bridge`), facts (:class:`keyscope.data.datasets.Fact` objects, or records of any fact schema
keyscope reads: CounterFact, EasyEdit, REP, …) and a method of :data:`keyscope.editing.EDITORS`, and returns an
:class:`EditSession`:

* ``rows`` and ``summary`` — Table 1's metrics (:mod:`keyscope.evaluation.metrics`) of each fact, scored exactly as
  :func:`keyscope.evaluation.evaluate.evaluate_fact` scores a row of ``keyscope evaluate``: each fact edited alone on the
  unedited model, then its edit prompt (Success), neighbourhood prompts (Locality) and rephrased, shuffled and
  long-context probes, in and out of domain, read top-1;
* ``model`` — the bridge with **every** fact's edit applied at once (each as computed on the unedited model, the
  same edits that were scored; ROME's rank-one updates add, REP's gated adaptors stack), until :meth:`EditSession.restore`
  or the end of a ``with`` block puts the weights back bit-exactly and removes the hooks — also on an exception.
  Edits computed apart add up as long as their keys differ: two facts of one subject write at nearly the same key,
  and the later one wins there (:mod:`keyscope.evaluation.sequential` computes each edit on the model the earlier ones left).

Facts are not filtered by what the model knows: the caller chooses them (:func:`keyscope.analysis.predictions.known_facts`
keeps those the model predicts, as the paper does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.covariance import load_or_compute_covariance
from keyscope.data.corpus import ContextSource, default_corpus
from keyscope.data.datasets import Fact, detect_schema, parse_records
from keyscope.data.perturbations import PerturbationConfig, fact_probes, subject_forms
from keyscope.editing.base import ModelEdit, check_methods, make_editor, prepare_context
from keyscope.evaluation.evaluate import compute_edits, evaluate_fact, fact_request, summarize
from keyscope.model.models import as_bridge, default_layer

__all__ = ["EditSession", "edit"]


@dataclass
class EditSession:
    """What :func:`edit` returns: the bridge with every edit applied (``model``), the edits (``edits``: one
    :class:`~keyscope.editing.ModelEdit` per fact, in order), the scored rows and their :func:`keyscope.evaluation.evaluate.summarize`
    (``summary[method][metric]``: micro-averaged rate, ``ci``, ``counts``). :meth:`restore` (or leaving a ``with``
    block) takes the edits out; two sessions on one model are restored in the reverse order of their making."""

    model: object
    method: str
    layer: int
    edits: list[ModelEdit]
    rows: list[dict]
    summary: dict
    _stack: ExitStack = field(repr=False, default_factory=ExitStack)

    def metrics(self) -> dict[str, float | None]:
        """Table 1's metrics of the method over every fact: ``{metric: rate}`` (``None`` where no prompt counts)."""
        entry = self.summary[self.method]
        return {metric: entry[metric] for metric in entry["counts"]}

    def restore(self) -> None:
        """Take every edit out of the model: weights back bit-exactly, hooks removed (idempotent)."""
        self._stack.close()

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _as_facts(facts: Sequence[Fact | Mapping]) -> list[Fact]:
    """``facts`` as :class:`Fact` objects: facts as they are, records (dicts of one schema) parsed; one line for a
    record that cannot be read."""
    records = [f for f in facts if not isinstance(f, Fact)]
    if not records:
        return list(facts)
    if len(records) != len(facts):
        raise KeyscopeError("pass facts either as keyscope Fact objects or as records (dicts), not both")
    parsed, failures, _ = parse_records(records, detect_schema(records))
    if failures:
        raise KeyscopeError(f"fact {failures[0]}")
    return parsed


def edit(model, facts: Sequence[Fact | Mapping], method: str = "rome", *, layer: int | None = None, cov=None,
         corpus=None, context_docs: Iterable[str] | None = None, probes: PerturbationConfig | None = None,
         pool: Sequence[Fact | Mapping] | None = None, seed: int = 0, batch_size: int = 32) -> EditSession:
    """Edit ``facts`` with ``method`` and score each (module docstring); returns the :class:`EditSession` whose
    ``model`` holds every edit until :meth:`EditSession.restore`.

    ``layer`` defaults to the model's edit layer (:func:`keyscope.model.models.default_layer`); ``cov`` to ``C`` over
    ``corpus`` (:func:`keyscope.analysis.covariance.load_or_compute_covariance`, cached); ``corpus`` to the model's default
    (:func:`keyscope.data.corpus.default_corpus`); ``context_docs`` — the text of the long-context probes — to
    ``corpus``'s documents. ``probes`` sets the queries per fact (:data:`keyscope.data.perturbations.PROTOCOLS`); its
    seed is ``seed``, as in ``keyscope evaluate``. ``pool``: the facts whose sentences make the out-of-domain long
    contexts and whose subjects' forms no probe may hold — ``keyscope evaluate`` uses the whole fact file; default
    ``facts``, which must then name more than one subject; REP's gate negatives come from it too, as from the fact
    file in ``keyscope evaluate``. ``cov`` must be the covariance of ``layer``; a multi-layer editor (MEMIT) gets
    its other layers' from ``corpus`` (cached).
    """
    (method,) = check_methods([method])
    model = as_bridge(model)
    facts = _as_facts(facts)
    if not facts:
        raise KeyscopeError("no facts to edit")
    layer = default_layer(model) if layer is None else layer
    corpus = corpus if corpus is not None else default_corpus(model)
    cov = cov if cov is not None else load_or_compute_covariance(model, layer, corpus, progress=False)
    if getattr(getattr(cov, "config", None), "layer", layer) != layer:
        raise KeyscopeError(f"cov is the covariance of layer {cov.config.layer}, not of the edit layer {layer}")
    pool = _as_facts(pool) if pool is not None else facts
    pooled = {f.case_id for f in pool}
    pool = pool + [f for f in facts if f.case_id not in pooled]  # the edited facts are in it
    if len({f.subject for f in pool}) < 2:
        raise KeyscopeError("the out-of-domain long contexts are made of facts about other subjects: pass facts of "
                            "several subjects, or a larger pool= (e.g. the whole fact file)")
    context = prepare_context(model, layer, cov, [method], pool, corpus, seed=seed, batch_size=batch_size,
                              load_covariance=lambda other: load_or_compute_covariance(model, other, corpus,
                                                                                       progress=False))
    editors = {method: make_editor(method, model, context)}
    probes = replace(probes or PerturbationConfig(), seed=seed)  # one seed, as EvalConfig has it
    contexts = ContextSource.of(context_docs if context_docs is not None else corpus)
    forms = subject_forms(pool)
    session = EditSession(model, method, layer, [], [], {})
    for fact in facts:
        queries = fact_probes(model.tokenizer, fact, contexts, probes, exclude=forms, other_facts=pool)
        computed, _ = compute_edits(editors, [fact_request(fact)], [queries])
        session.rows.append(evaluate_fact(model, fact, queries, editors, context, edits=computed))
        session.edits.append(computed[method])
    session.summary = summarize(session.rows, seed=seed)
    with ExitStack() as stack:  # every edit applied; all taken out again if entering one fails
        for one in session.edits:
            stack.enter_context(one.applied(model))
        session._stack = stack.pop_all()
    return session
