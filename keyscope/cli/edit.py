"""``keyscope edit``: one ROME edit and how far it reaches — the edit prompt, rephrased subjects, token
shuffles and a long context, each with its key's normalised edit strength ``s(k) = kᵀC⁻¹k*/k*ᵀC⁻¹k*`` and
the model's top predictions before and after the edit.

    keyscope edit --model gpt2-xl --subject "Danielle Darrieux" --prompt "{}'s mother tongue is" --target English
    keyscope edit --case 12                      # a fact of the factworld world (target = its target_new)
    keyscope edit --case 12 --save edited/       # and save the edited model as a Hugging Face folder

``--save DIR`` writes the edited model (:func:`keyscope.model.models.save_model`) into a hidden folder beside ``DIR``
and moves it into place at the end, so a failure leaves nothing at ``DIR``; ``DIR`` must be new or empty (checked
before any work), and the model in memory is the unedited one again afterwards.
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    KNOWN_HELP,
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_dtype_argument,
    add_known_argument,
    add_progress_argument,
    add_rome_setting_argument,
    add_seed_argument,
    command_parser,
    non_negative_int,
)
from keyscope.cli.output import write_json
from keyscope.editing.request import check_request_tokens


def _find_case(facts, data: str, case: str):
    for fact in facts:
        if str(fact.case_id) == str(case):
            return fact
    ids = [str(f.case_id) for f in facts]
    shown = f"{ids[0]}..{ids[-1]}" if ids else "none"
    raise KeyscopeError(f"unknown case id {case!r} in {data} ({len(ids)} facts, case ids {shown})")


def edit_request(args):
    """The edit request, its fact (``None`` without ``--case``) and the facts of ``--data`` (``()`` when there
    are none: a model other than factworld without ``--data`` or ``--known``), checked before the model loads
    (``--known`` is applied once it has: :func:`known_request_facts`)."""
    from keyscope.cli.common import data_source
    from keyscope.data.datasets import load_facts
    from keyscope.editing.request import EditRequest

    fact, facts = None, ()
    if args.case is not None or args.data is not None or args.model == "factworld" or args.known:
        data = data_source(args)
        facts = load_facts(data)
        if args.case is not None:
            fact = _find_case(facts, data, args.case)
    subject = args.subject or (fact.subject if fact else None)
    prompt = args.prompt or (fact.prompt if fact else None)
    target = args.target or (fact.target_new if fact else None)
    missing = [flag for flag, value in (("--subject", subject), ("--prompt", prompt), ("--target", target))
               if not value]
    if missing:
        raise KeyscopeError(f"give {', '.join(missing)} (or --case ID to take them from a fact)")
    target_true = fact.target_true if fact is not None and subject == fact.subject else None
    return EditRequest(prompt, subject, target, target_true), fact, facts


def known_request_facts(args, model, fact, facts) -> list:
    """With ``--known``, the facts of ``--data`` that ``model`` knows (:func:`keyscope.cli.common.known_subset`) and a
    one-line error if the ``--case`` fact is not one of them; without it, ``facts`` as they are."""
    from keyscope.cli.common import known_subset

    known = known_subset(args, model, facts)
    if args.known and fact is not None and all(f is not fact for f in known):
        raise KeyscopeError(f"--known: the model does not know case {fact.case_id} (its top-1 next token after "
                            f"{fact.filled_prompt!r} is not the first token of {fact.target_true!r}); drop --known "
                            f"to edit it anyway")
    return known


def cmd_edit(args) -> int:
    from keyscope.cli.common import check_rome_setting, covariance, model_and_layer, rome_config
    from keyscope.data import corpus as corpora
    from keyscope.data.perturbations import rephrase_kinds, subject_forms
    from keyscope.editing import rome
    from keyscope.studies import edit as experiment

    check_rome_setting(args)
    check_save_folder(args.save)
    request, fact, facts = edit_request(args)
    model, layer = model_and_layer(args)
    facts = known_request_facts(args, model, fact, facts)
    check_request_tokens(model.tokenizer, request)  # an <unk> subject or target fails before C
    cov, source = covariance(model, layer, args, args.cov_tokens, progress=not args.no_progress)
    probes = experiment.ProbeConfig(experiment.edit_probes(args.shuffles, args.context_tokens, args.seed))
    config = experiment.EditConfig(layer, probes, rome_config(model, args))
    own = fact is not None and request.subject == fact.subject
    exclude = subject_forms(facts)  # a shuffle that spells another subject's name is no shuffle
    report = experiment.run(model, request, config, cov=cov, context_docs=corpora.ContextSource(source),
                            rephrasings=fact.subject_rephrase if own else (),
                            rephrase_kinds=rephrase_kinds(fact) if own else None, exclude=exclude,
                            case_id=fact.case_id if fact is not None else None, progress=not args.no_progress)
    print(experiment.format_report(report))
    if args.save:
        with rome.applied(model, report.edit):  # the weights are the unedited ones again when the block ends
            save_edited(model, args.save)
        print(f"saved the edited model to {args.save} (use it with --model {args.save} or "
              f"keyscope.model.models.load_model)")
    write_json(args.json, report.as_json())
    return 0


def check_save_folder(path: str | None) -> None:
    """A one-line error, before any work, for a ``--save`` folder that exists and is not empty (or is a file;
    :func:`keyscope.cli.output.check_outputs` has checked that it can be written)."""
    from pathlib import Path

    if path and Path(path).is_dir() and any(Path(path).iterdir()):
        raise KeyscopeError(f"--save {path} is a folder that is not empty; give a new or empty folder")


def save_edited(model, path: str) -> None:
    """Save ``model`` as a Hugging Face folder at ``path`` (new or empty): written into a hidden folder beside it,
    moved into place at the end; nothing is left behind when writing fails."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from keyscope.model.models import save_model

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.keyscope-save-", dir=target.parent))
    try:
        save_model(model, staging)
        if target.is_dir():
            target.rmdir()  # empty (checked before the work): the finished folder takes its place
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: ``--known``'s help for ``edit`` (and ``reach`` with ``--case``).
KNOWN_EDIT_HELP = f"{KNOWN_HELP}; --case must be one of them"


def add_request_arguments(parser) -> None:
    """``--subject``, ``--prompt``, ``--target`` and ``--case``: the edit request (:func:`edit_request`)."""
    parser.add_argument("--subject", help="the subject whose fact is edited (must occur in --prompt)")
    parser.add_argument("--prompt", help="the prompt, with {} where the subject goes (or holding the subject)")
    parser.add_argument("--target", help="the new target to write")
    parser.add_argument("--case", help="take subject, prompt and target (its target_new) from this fact's case id")


def add_probe_arguments(parser) -> None:
    """``--shuffles`` and ``--context-tokens``: the subject's forms shown (:class:`~keyscope.studies.edit.ProbeConfig`)."""
    parser.add_argument("--shuffles", type=non_negative_int, default=10, help="token shuffles of the subject shown (default 10)")
    parser.add_argument("--context-tokens", type=non_negative_int, default=300,
                        help="tokens of unrelated text before the long-context prompt (default 300; 0: none)")


def register(sub) -> None:
    """Add ``keyscope edit`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "edit", help="one ROME edit: predictions before/after on rephrased, shuffled and long-context prompts, "
                          "with each key's edit strength; --save writes the edited model",
        description="Computes one ROME edit (--subject, --prompt and --target, or --case ID to take them from a fact "
                    "of --data) and shows the model's top predictions before and after it on the edit prompt, the "
                    "subject's rephrased forms, token and word shuffles and a prompt behind a long unrelated "
                    "context, each with its key's normalised edit strength s(k) = k^T C^-1 k* / k*^T C^-1 k*. "
                    "The model's weights are restored afterwards; --save DIR also writes the edited model as a "
                    "Hugging Face folder that --model DIR (or keyscope.model.models.load_model) loads.",
        examples=["keyscope edit --case 12",
                  "keyscope edit --model gpt2-xl --subject \"Danielle Darrieux\" --prompt \"{}'s mother tongue is\" "
                  "--target English --save gpt2-xl-edited"])
    add_request_arguments(p)
    p.add_argument("--data", help="facts for --case: factworld (default for factworld) or a CounterFact/REP file")
    add_known_argument(p, KNOWN_EDIT_HELP)
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    p.add_argument("--corpus", help="corpus for C = E[k k^T] and the long context (default: factworld filler for "
                                    "factworld, WikiText-103 otherwise; or a text file/folder)")
    add_cov_tokens_argument(p)
    p.add_argument("--recompute", action="store_true", help="recompute C even if cached")
    add_probe_arguments(p)
    add_seed_argument(p, "the shuffles")
    add_rome_setting_argument(p)
    add_progress_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write everything shown as JSON")
    p.add_argument("--save", metavar="DIR",
                   help="also save the edited model as a Hugging Face folder DIR (new or empty; the model in memory "
                        "is restored); load it with --model DIR")
    p.set_defaults(func=cmd_edit)
