"""Throughput of the corpus neighbour scan against the bare forward pass stopped at the same layer.

Both runs see the same pre-tokenised windows (tokenisation is excluded from both timings): the bare run only
computes the layer's keys (:func:`keyscope.analysis.keys.layer_keys`), the scan additionally scores every position
against all subjects, masks subject occurrences, keeps the running top-k and gathers prefixes. Prints
``ratio = scan throughput / bare throughput`` (target ≥ 0.8). Each run is repeated and the fastest kept,
because the machine is shared.

    python benchmarks/bench_scan.py                      # random GPT-2-small-shaped model, GPT-2 tokenizer
    python benchmarks/bench_scan.py --layers 4 --width 192 --layer 1   # factworld-sized (d_mlp 768)
    python benchmarks/bench_scan.py --model factworld --corpus factworld
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from keyscope.analysis import scan
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.keys import layer_keys
from keyscope.data.corpus import token_batches
from keyscope.data.datasets import Fact, load_facts
from keyscope.model.models import default_layer, load_model

DATA = Path("/work/shared/data")
GPT2_TOKENIZER = DATA / "tokenizer" / "gpt2"
WIKITEXT = DATA / "wikitext" / "wikitext-2_wiki.valid.tokens"
COUNTERFACT = DATA / "counterfact" / "counterfact_orig_format_1400_patil.json"


def random_gpt2(directory: Path, n_layers: int, width: int, tokenizer_dir: Path) -> Path:
    """A randomly initialised GPT-2 checkpoint (``width`` wide, MLP ``4 * width``; GPT-2 small is 768) with the
    real GPT-2 tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=width, n_head=max(1, width // 64), n_positions=1024))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model name or directory (default: a random GPT-2-small-shaped model)")
    parser.add_argument("--layers", type=int, default=12, help="depth of the random model")
    parser.add_argument("--width", type=int, default=768, help="d_model of the random model (d_mlp = 4x)")
    parser.add_argument("--layer", type=int, help="scan layer (default: the model's default edit layer)")
    parser.add_argument("--corpus", default=str(WIKITEXT) if WIKITEXT.exists() else "factworld")
    parser.add_argument("--facts", default=str(COUNTERFACT) if COUNTERFACT.exists() else "factworld")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        name = args.model or str(random_gpt2(Path(tmp) / "gpt2-random", args.layers, args.width, GPT2_TOKENIZER))
        model = load_model(name)
    layer = default_layer(model) if args.layer is None else args.layer
    tokenizer = model.tokenizer
    facts: list[Fact] = load_facts(args.facts, on_error="skip")[: args.subjects]
    batches = list(token_batches(tokenizer, args.corpus, args.tokens, args.seq_len, args.batch_size))
    n_tokens = sum(b.n_tokens for b in batches)
    cov = KeyCovariance(layer, progress=False)
    for batch in batches:
        cov.partial_fit(scan.layer_keys_of(model, batch, layer))
    cov.cholesky()
    config = scan.ScanConfig(layer=layer, n_tokens=n_tokens, seq_len=args.seq_len, batch_size=args.batch_size)
    k_stars = scan.subject_keys(model, facts, layer)
    per_fact = [scan.filter_variants(tokenizer, f) for f in facts]
    masks = {name: [v[name] for v in per_fact] for name in scan.FILTERS}
    subjects = [f.subject for f in facts]

    def bare() -> None:
        for batch in batches:
            layer_keys(model, batch.input_ids, batch.attention_mask, layer)

    def scanned() -> None:
        scan.scan_batches(model, batches, k_stars, cov, masks, config, subjects, progress=False)

    bare()  # warm-up
    t_bare, t_scan = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so load changes hit both
        t_bare = min(t_bare, timed(bare, 1))
        t_scan = min(t_scan, timed(scanned, 1))
    print(f"model {name if args.model else f'random GPT-2 ({args.layers} layers, d_mlp {model.cfg.d_mlp})'}, "
          f"layer {layer}, {len(facts)} subjects, {n_tokens} tokens in windows of {args.seq_len}, "
          f"device {model.cfg.device}, torch threads {torch.get_num_threads()}")
    print(f"bare forward to layer {layer}: {t_bare:.2f} s  ({n_tokens / t_bare:,.0f} tok/s)")
    print(f"scan:                      {t_scan:.2f} s  ({n_tokens / t_scan:,.0f} tok/s)")
    print(f"ratio (scan / bare throughput): {t_bare / t_scan:.3f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
