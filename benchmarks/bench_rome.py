"""Seconds per ROME edit, split into prefix sampling, k*, v* and the rank-one update.

    python benchmarks/bench_rome.py                          # factworld (if built) + a random GPT-2-small
    python benchmarks/bench_rome.py --model path/to/hf_dir --layer 5 --edits 5
    python benchmarks/bench_rome.py --skip-gpt2              # only --model

Two models are timed:

* ``--model`` (default ``factworld``): any local Hugging Face directory or cached hub name; skipped with a
  one-line note if it cannot be loaded (the shipped factworld model may not be built yet);
* a random model of GPT-2-small's size (12 layers, d_model 768, d_mlp 3072, 12 heads, a 50 257-word
  word-level vocabulary), built with ``transformers.GPT2Config`` and random initialisation and saved to a
  temporary directory.

The layer's covariance comes from :func:`keyscope.analysis.covariance.load_or_compute_covariance` with
``--cov-tokens`` tokens (cached in a temporary directory, so its one-off cost is reported separately).
Every edit runs with the model's ROME hyper-parameters (:meth:`ROMEConfig.for_model`: the published ones, or
those of the model's card for factworld), samples its own context prefixes and uses a different request
(factworld: counterfactual edits of its own facts; otherwise fixed requests over the test sentences' words);
the table reports the mean and the min–max over ``--edits`` edits, plus the number of v* steps (early
stopping varies it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope._infra.errors import KeyscopeError  # noqa: E402
from keyscope.analysis.covariance import load_or_compute_covariance  # noqa: E402
from keyscope.editing import rome  # noqa: E402
from keyscope.editing.request import EditRequest  # noqa: E402
from keyscope.model.models import FACTWORLD, default_layer, load_model  # noqa: E402

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} played basketball for the", "Michael Jordan", "Lakers"),
    EditRequest("{} plays the", "Toko Yasuda", "piano"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} was created by", "Apple A5", "Google"),
]

def factworld_requests(n: int = 5) -> list[EditRequest]:
    """Counterfactual edits of factworld facts: each fact's first template, the relation's next target."""
    from keyscope.factworld.world import build_world

    world = build_world()
    requests = []
    for fact in world.facts[:: max(1, len(world.facts) // n)][:n]:
        relation = world.relation(fact.relation_id)
        new = next(t for t in relation.targets if t != fact.target)
        requests.append(EditRequest(relation.templates[0], world.subject(fact.subject_id).name, new, fact.target))
    return requests


GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_inner": 3072, "n_head": 12, "vocab_size": 50257}


def _documents(n_docs: int = 400) -> list[str]:
    """Synthetic filler text for the covariance (the tiny test sentences, shuffled into documents)."""
    import random

    from tests.hf_tiny import TRAINING_TEXT

    rng = random.Random(0)
    sentences = sorted(set(TRAINING_TEXT))
    return [" ".join(rng.choice(sentences) for _ in range(12)) for _ in range(n_docs)]


def save_gpt2_small(path: Path) -> Path:
    """A random GPT-2-small-sized checkpoint with a word-level tokenizer of GPT-2's vocabulary size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.hf_tiny import TRAINING_TEXT, word_level_tokenizer

    n_words = GPT2_SMALL["vocab_size"] - 4  # 4 special tokens
    known = sorted({w for text in TRAINING_TEXT for w in text.split()})
    filler = [f"w{i}" for i in range(n_words - len(known))]
    tokenizer = word_level_tokenizer([" ".join(known), " ".join(filler)])
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, n_embd=GPT2_SMALL["n_embd"], n_layer=GPT2_SMALL["n_layer"],
        n_head=GPT2_SMALL["n_head"], n_inner=GPT2_SMALL["n_inner"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bench(label: str, model, layer: int | None, corpus, cov_tokens: int, n_edits: int, cache_root: Path,
          requests: list[EditRequest] = REQUESTS) -> list[str]:
    """Time ``n_edits`` edits on ``model``; return the table rows."""
    layer = default_layer(model) if layer is None else layer
    start = time.perf_counter()
    cov = load_or_compute_covariance(model, layer, corpus, n_tokens=cov_tokens, progress=False, root=cache_root)
    cov.cholesky()
    seconds_cov = time.perf_counter() - start
    config = rome.ROMEConfig.for_model(model)
    traces = []
    for i in range(n_edits):
        edit = rome.compute_edit(model, requests[i % len(requests)], layer, cov, config)
        traces.append(edit.trace)
    cfg = model.cfg
    print(
        f"{label}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, vocab {cfg.d_vocab}, "
        f"layer {layer}, device {cfg.device}, torch threads {torch.get_num_threads()}; "
        f"C from {cov.n_tokens_} tokens in {seconds_cov:.2f} s (one-off, cached)"
    )

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):7.3f} ({min(values):.3f}–{max(values):.3f})".ljust(23)

    stages = {
        "prefixes": [t.seconds_prefixes for t in traces],
        "k*": [t.seconds_k_star for t in traces],
        "v*": [t.seconds_v_star for t in traces],
        "update": [t.seconds_update for t in traces],
        "total": [t.seconds for t in traces],
    }
    steps = [t.n_steps for t in traces]
    return [
        f"| {label:<14} | " + " | ".join(cell(v) for v in stages.values())
        + f" | {statistics.mean(steps):5.1f} | {statistics.mean(s / n for s, n in zip(stages['v*'], steps)):8.3f} |"
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=FACTWORLD, help="HF model directory or cached hub name (default: factworld)")
    parser.add_argument("--layer", type=int, default=None, help="edit layer of --model (default: its default layer)")
    parser.add_argument("--corpus", default=None,
                        help="covariance corpus of --model (default: factworld for factworld, else synthetic text)")
    parser.add_argument("--cov-tokens", type=int, default=10_000, help="tokens of the covariance estimate")
    parser.add_argument("--edits", type=int, default=3, help="edits timed per model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; use 1 on a machine shared with other jobs)")
    parser.add_argument("--skip-gpt2", action="store_true", help="do not build and time the random GPT-2-small")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_root = Path(tmp) / "cache"
        try:
            model = load_model(args.model, device=args.device)
        except KeyscopeError as exc:
            print(f"{args.model}: skipped ({exc})")
        else:
            factworld = args.model == FACTWORLD
            corpus = args.corpus or (FACTWORLD if factworld else _documents())
            requests = factworld_requests() if factworld else REQUESTS
            rows += bench(Path(args.model).name or args.model, model, args.layer, corpus, args.cov_tokens, args.edits,
                          cache_root, requests)
            del model
        if not args.skip_gpt2:
            path = save_gpt2_small(Path(tmp) / "gpt2-small-random")
            model = load_model(str(path), device=args.device)
            rows += bench("gpt2-small-rnd", model, None, _documents(), args.cov_tokens, args.edits, cache_root)

    print()
    print("seconds per edit: mean (min–max)")
    print(f"| {'model':<14} | " + " | ".join(f"{name:<23}" for name in ("prefixes", "k*", "v*", "update", "total"))
          + " | steps | s/v*step |")
    print("|" + "|".join("-" * (w + 2) for w in (14, 23, 23, 23, 23, 23, 5, 8)) + "|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
