"""One ROME edit, shown through the prompts whose keys it does and does not reach.

``run`` computes the ROME edit of one request at the layer of its :class:`EditConfig`
(:func:`keyscope.editing.rome.compute_edit`) and reads the model's next-token predictions before and after it (:func:`keyscope.editing.rome.applied`) on the probes of Yan et al.
("Keys to Robust Edits", Sec. 3): the edit prompt itself, each rephrased subject, up to ``n_shuffles``
token shuffles and as many word-order shuffles of the subject (:mod:`keyscope.data.perturbations`) and the prompt
behind ``long_context_tokens`` tokens of unrelated text.

By the patch view of the edited layer (Lemma 4.1 / Corollary 4.2 of the paper; :func:`keyscope.editing.rome.predicted_value`)::

    W' k + b = W k + b + s(k) · (v* − W k*),        s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*

a probe's prediction moves only as far as its key's normalised edit strength ``s(k)`` lets the patch
through, so each probe is reported with ``s(k)`` (:meth:`keyscope.editing.rome.RankOneEdit.strength`), its top-k tokens
before and after, and the probability of the new target's first token before and after. The probes' keys
are read before the edit; the edit at layer ``L`` does not change any layer-``L`` key (the key is the input
of the edited ``W_out``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from keyscope.analysis import similarity
from keyscope.analysis.predictions import decode_token, next_token_top_k, prompt_context, target_context
from keyscope.data import perturbations
from keyscope.data.datasets import Fact
from keyscope.data.prompts import fill
from keyscope.editing import rome
from keyscope.editing.request import EditRequest
from keyscope.model.models import model_name


def edit_probes(n_shuffles: int = 10, long_context_tokens: int = 300, seed: int = 0) -> perturbations.PerturbationConfig:
    """The probes an edit is shown on, as a :class:`~keyscope.data.perturbations.PerturbationConfig`: every rephrased
    subject (none held out), up to ``n_shuffles`` token shuffles and as many word-order shuffles of the subject
    (drawn with ``seed``), and one prompt behind ``long_context_tokens`` tokens of unrelated text (as in the
    paper)."""
    return perturbations.PerturbationConfig(
        n_rephrase=None, n_shuffles=n_shuffles, n_word_shuffles=n_shuffles, n_long_contexts=1,
        long_context_tokens=long_context_tokens, n_random=0, seed=seed, out_of_domain=False)


@dataclass(frozen=True)
class ProbeConfig:
    """Which probes an edit is shown on (:func:`edit_probes`) and how many predictions each shows."""

    probes: perturbations.PerturbationConfig = field(default_factory=edit_probes)
    top_k: int = 3  # predictions shown per probe
    batch_size: int = 32


@dataclass(frozen=True)
class Prediction:
    token: str
    probability: float


@dataclass(frozen=True)
class ProbeOutcome:
    """One probe: its prompt, ``s(k)`` of its key against ``k*``, and the predictions before/after the edit."""

    kind: str
    prompt: str
    subject: str
    strength: float  # s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*
    before: tuple[Prediction, ...]
    after: tuple[Prediction, ...]
    target_probability_before: float  # P(first token of target_new | prompt)
    target_probability_after: float
    n_context_tokens: int = 0

    def as_json(self) -> dict:
        return {
            "kind": self.kind, "prompt": self.prompt, "subject": self.subject, "strength": self.strength,
            "target_probability_before": self.target_probability_before,
            "target_probability_after": self.target_probability_after,
            "before": [{"token": p.token, "probability": p.probability} for p in self.before],
            "after": [{"token": p.token, "probability": p.probability} for p in self.after],
            **({"n_context_tokens": self.n_context_tokens} if self.kind == perturbations.LONG else {}),
        }


@dataclass
class EditReport:
    """The edit and every probe's outcome."""

    model: str
    layer: int
    edit: rome.RankOneEdit = field(repr=False)
    probes: list[ProbeOutcome]
    case_id: int | str | None = None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of each stage of the edit: prefix sampling, k*, v*, the rank-one update, and their sum."""
        trace = self.edit.trace
        return {"prefixes": trace.seconds_prefixes, "k_star": trace.seconds_k_star, "v_star": trace.seconds_v_star,
                "update": trace.seconds_update, "total": trace.seconds}

    def as_json(self) -> dict:
        request, trace = self.edit.request, self.edit.trace
        return {
            "model": self.model,
            "layer": self.layer,
            "case_id": self.case_id,
            "request": {"prompt": request.template, "subject": request.subject, "target_new": request.target_new,
                        "target_true": request.target_true},
            "seconds": self.timings,
            "v_star": {
                "steps": trace.n_steps, "stopped_early": trace.stopped_early,
                "target_probability": trace.target_probability[-1], "loss": trace.loss[-1],
                "value_norm_before": trace.value_norm, "delta_norm": trace.delta_norm,
                "max_delta_norm": trace.max_delta_norm,
            },
            "probes": [p.as_json() for p in self.probes],
        }


def build_probes(tokenizer, request: EditRequest, rephrasings, context_docs, config: ProbeConfig,
                 max_positions: int | None = None, rephrase_kinds=None,
                 exclude: frozenset[str] = frozenset()) -> list[perturbations.Probe]:
    """The probes of ``request`` (:func:`keyscope.data.perturbations.fact_probes` under ``config.probes``): the edit
    prompt, its rephrased subjects (``rephrase_kinds`` naming each), the token and word-order shuffles (none
    spelling a form of ``exclude``) and the long contexts.

    The long context is shortened to fit ``max_positions`` (the model's context length) with the prompt and
    a few tokens to spare; ``context_docs=None`` or ``long_context_tokens=0`` leaves it out.
    """
    template, subject = request.template, request.subject
    probes = config.probes
    if max_positions is not None:
        prompt_length = len(prompt_context(tokenizer, fill(template, subject).text))
        probes = replace(probes, long_context_tokens=max(0, min(probes.long_context_tokens,
                                                                max_positions - prompt_length - 8)))
    rephrasings = tuple(rephrasings or ())
    kinds = {"subject_rephrase_kind": list(rephrase_kinds)} if rephrase_kinds is not None else {}
    fact = Fact(case_id=None, prompt=template, subject=subject, target_true=request.target_true,
                target_new=request.target_new, subject_rephrase=rephrasings, extras=kinds)
    return perturbations.fact_probes(tokenizer, fact, context_docs, probes, exclude=exclude).all()


def _predictions(tokenizer, topk, row: int) -> tuple[Prediction, ...]:
    return tuple(Prediction(decode_token(tokenizer, i), float(p))
                 for i, p in zip(topk.ids[row].tolist(), topk.probabilities[row].tolist()))


@dataclass(frozen=True)
class EditConfig:
    """One edit's study: the ``layer`` edited, the probes it is shown on (:class:`ProbeConfig`) and ROME's
    hyper-parameters (``rome_config``; default: :meth:`keyscope.editing.rome.ROMEConfig.for_model`). No I/O."""

    layer: int
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    rome_config: rome.ROMEConfig | None = None


def run(model, request: EditRequest, config: EditConfig, *, cov, context_docs=None, rephrasings=(),
        rephrase_kinds=None, exclude: frozenset[str] = frozenset(), case_id=None, progress: bool = False) -> EditReport:
    """Compute the ROME edit of ``request`` at ``config.layer`` (covariance ``cov``) and probe it (see the module
    docstring): ``context_docs`` is the text of the long context, ``rephrasings`` the subject's rephrased forms
    (``rephrase_kinds`` naming each), ``exclude`` the forms no shuffle may spell; ``progress`` shows the v*
    optimisation. The model's weights are the same on return."""
    layer, shown = config.layer, config.probes  # shown: the probes and predictions shown
    tokenizer = model.tokenizer
    probes = build_probes(tokenizer, request, rephrasings, context_docs, shown,
                          max_positions=getattr(model.cfg, "n_ctx", None), rephrase_kinds=rephrase_kinds,
                          exclude=exclude)
    keys = similarity.probe_keys(model, probes, layer, batch_size=shown.batch_size)  # (n_probes, d_mlp)
    edit = rome.compute_edit(model, request, layer, cov, config.rome_config, progress=progress)
    strength = edit.strength(keys).cpu()  # (n_probes,)

    contexts, targets = [], []
    for probe in probes:
        context, target = target_context(tokenizer, probe.prompt, request.target_new)
        contexts.append(context)
        targets.append(target)
    kwargs = dict(k=shown.top_k, batch_size=shown.batch_size, targets=targets)
    before = next_token_top_k(model, contexts, **kwargs)
    with rome.applied(model, edit):
        after = next_token_top_k(model, contexts, **kwargs)
    outcomes = [
        ProbeOutcome(
            probe.kind, probe.prompt, probe.subject, float(strength[i]), _predictions(tokenizer, before, i),
            _predictions(tokenizer, after, i), float(before.target_probabilities[i]),
            float(after.target_probabilities[i]), probe.n_context_tokens,
        )
        for i, probe in enumerate(probes)
    ]
    return EditReport(model_name(model), layer, edit, outcomes, case_id)


def _shown(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def _tokens(predictions) -> str:
    return ", ".join(f"{p.token.strip() or repr(p.token)} {p.probability:.2f}" for p in predictions)


def format_report(report: EditReport) -> str:
    """The report as text: the request, the timings, then per probe ``s(k)``, P(new target) before → after
    and the top-k tokens before and after."""
    edit, trace = report.edit, report.edit.trace
    request = edit.request
    t = report.timings
    head = [
        f"{report.model}, layer {report.layer}: {fill(request.template, request.subject).text!r} -> {request.target_new!r}"
        + (f" (case {report.case_id}, true target {request.target_true!r})" if report.case_id is not None else ""),
        f"edit time: k* {t['k_star']:.3f} s, v* {t['v_star']:.3f} s ({trace.n_steps} steps, P(target) "
        f"{trace.target_probability[-1]:.3f}), update {t['update']:.4f} s; prefixes {t['prefixes']:.3f} s; "
        f"total {t['total']:.3f} s",
        f"value at k*: |W k* (+b)| = {trace.value_norm:.3f}, |v* - W k*| = {trace.delta_norm:.3f} "
        f"(clamp {trace.max_delta_norm:.3f})",
        "s(k) = k^T C^-1 k* / k*^T C^-1 k*; P(new) = probability of the new target's first token",
    ]
    lines = []
    for probe in report.probes:
        lines.append(f"[{probe.kind}] s(k) = {probe.strength:.3f}  P(new) {probe.target_probability_before:.3f} -> "
                     f"{probe.target_probability_after:.3f}  {_shown(probe.prompt)}")
        lines.append(f"    before: {_tokens(probe.before)}")
        lines.append(f"    after:  {_tokens(probe.after)}")
    return "\n".join(head + lines)
