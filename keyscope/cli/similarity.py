"""``keyscope similarity``: Figure 3 — how far a subject's key moves under rephrasing, shuffling and long
contexts, in the whitened metric ``C⁻¹`` that decides how far a ROME edit reaches."""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_dtype_argument,
    add_known_argument,
    add_output_arguments,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def cmd_similarity(args) -> int:
    from keyscope.cli.common import (
        check_subject_tokens,
        covariance,
        data_source,
        known_subset,
        model_and_layer,
    )
    from keyscope.data import corpus as corpora
    from keyscope.data.datasets import load_facts
    from keyscope.studies import similarity as experiment

    data = data_source(args)
    facts = load_facts(data)
    _pca_facts(facts, args.pca_subject, data)  # an unknown subject fails before the model loads
    model, layer = model_and_layer(args)
    facts = known_subset(args, model, facts)
    pca = _pca_facts(facts, args.pca_subject, f"the facts of {data} the model knows (--known)")
    check_subject_tokens(model, experiment.pick_facts(facts, args.n_subjects, args.seed) + pca)
    progress = not args.no_progress
    cov, source = covariance(model, layer, args, args.cov_tokens, progress=progress)
    context_docs = corpora.ContextSource(source)
    config = experiment.SimilarityConfig(layer, n_subjects=args.n_subjects, seed=args.seed,
                                         pca_subject=args.pca_subject)
    result = experiment.run(model, facts, config, cov=cov, context_docs=context_docs, out_dir=args.out,
                            model_name=args.model, progress=progress)
    print(f"{args.model}, layer {layer}: normalised edit strength k^T C^-1 k_orig / k_orig^T C^-1 k_orig "
          f"over {len({r['case_id'] for r in result.rows})} subjects (C from {cov.n_tokens_:,} tokens of {source})")
    print(experiment.format_table(result.summary))
    for path in result.files:
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    return 0


def _pca_facts(facts, subject: str | None, where: str) -> list:
    """The first fact of ``--pca-subject`` (``[]`` without it), or a one-line error naming ``where`` it was looked for."""
    pca = [f for f in facts if f.subject == subject][:1]
    if subject is not None and not pca:
        raise KeyscopeError(f"--pca-subject {subject!r} is not a subject of {where}")
    return pca


def register(sub) -> None:
    """Add ``keyscope similarity`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "similarity", help="Figure 3: whitened similarity of perturbed subject keys",
        description="Figure 3 of Yan et al.: how far a subject's key k moves when the subject is rephrased, its "
                    "tokens or words are shuffled, or a long unrelated context comes first, measured as the "
                    "normalised edit strength s(k) = k^T C^-1 k_orig / k_orig^T C^-1 k_orig that decides how far "
                    "a ROME edit of the original reaches (1 = fully, 0 = not at all), with random other subjects "
                    "as a baseline. C is the layer's key covariance over --cov-tokens corpus tokens (cached). "
                    "Prints the table and writes fig3_similarity.png, fig3_pca.png and fig3_similarity.csv "
                    "into --out.",
        examples=["keyscope similarity",
                  "keyscope similarity --model smollm2-135m --data FACTS.json --known --corpus DIR "
                  "--n-subjects 200 --out figures/smollm2/similarity --json sim.json"])
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    p.add_argument("--data", help="facts: factworld (default for factworld) or a CounterFact/REP JSON file (or several "
                        "of one schema joined by commas, read as one)")
    add_known_argument(p)
    p.add_argument("--n-subjects", type=positive_int, default=100, help="number of subjects (default 100)")
    add_seed_argument(p, "the subjects drawn and their shuffles and long contexts")
    p.add_argument("--corpus", help="corpus for C = E[k k^T] and long contexts (default: factworld filler for "
                                    "factworld, WikiText-103 otherwise; or a text file/folder)")
    add_cov_tokens_argument(p)
    p.add_argument("--recompute", action="store_true", help="recompute C even if cached")
    p.add_argument("--pca-subject", help="subject for the PCA panel (default: the first studied)")
    add_output_arguments(p, "figures and CSV", "also write the summary table as JSON")
    p.set_defaults(func=cmd_similarity)
