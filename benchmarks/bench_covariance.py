"""Throughput of the key-covariance estimate against a bare forward pass stopped at the same layer.

    python benchmarks/bench_covariance.py                      # builds a small random LLaMA
    python benchmarks/bench_covariance.py --model path/to/hf_dir --layer 5 --tokens 50000

Prints tokens/s for

* ``full``      — the whole forward pass (logits), for reference;
* ``bare``      — ``model(ids, attention_mask=…, stop_at_layer=layer + 1)``: the baseline;
* ``keys``      — :func:`keyscope.analysis.keys.layer_keys` (stopped forward + hook that ends the pass at the key);
* ``fit``       — :meth:`KeyCovariance.fit_batches` on the same pre-tokenised batches (keys + masking +
  float32 Gram into the float64 accumulator);
* ``end2end``   — :meth:`KeyCovariance.fit` from raw text (tokenising and packing included);

and the ratios ``fit / bare`` and ``end2end / bare`` (target ≥ 0.8). Every rate counts the same tokens (the
counted, non-BOS, non-padding positions).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope.analysis.covariance import KeyCovariance  # noqa: E402
from keyscope.analysis.keys import layer_keys  # noqa: E402
from keyscope.data.corpus import token_batches  # noqa: E402
from keyscope.model.models import load_model  # noqa: E402


def _corpus(n_docs: int = 2000) -> list[str]:
    import random

    from tests.hf_tiny import TRAINING_TEXT

    rng = random.Random(0)
    sentences = sorted(set(TRAINING_TEXT))
    return [" ".join(rng.choice(sentences) for _ in range(12)) for _ in range(n_docs)]


def _best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, run round-robin so load drifts hit all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory or hub name (default: a random small LLaMA)")
    parser.add_argument("--arch", default="llama", help="architecture of the random model (llama, gpt2, …)")
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-mlp", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=None, help="default: a third of the depth")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from tests.hf_tiny import save_tiny_checkpoint

            path = str(save_tiny_checkpoint(args.arch, Path(tmp) / args.arch, n_layers=args.n_layers,
                                            d_model=args.d_model, d_mlp=args.d_mlp, n_heads=4))
        model = load_model(path, device=args.device)
        layer = args.layer if args.layer is not None else model.cfg.n_layers // 3
        docs = _corpus()
        batches = list(token_batches(model.tokenizer, docs, args.tokens, args.seq_len, args.batch_size))
        n = sum(b.n_tokens for b in batches)
        print(f"model {path} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, d_mlp {model.cfg.d_mlp}), "
              f"layer {layer}, {n} tokens in {len(batches)} batches of {args.batch_size}×{args.seq_len}, "
              f"device {model.cfg.device}, torch threads {torch.get_num_threads()}")

        def full():
            with torch.no_grad():
                for b in batches:
                    model(b.input_ids.to(model.cfg.device), attention_mask=b.attention_mask.to(model.cfg.device))

        def bare():
            with torch.no_grad():
                for b in batches:
                    model(b.input_ids.to(model.cfg.device), attention_mask=b.attention_mask.to(model.cfg.device),
                          stop_at_layer=layer + 1, return_type=None)

        def keys():
            for b in batches:
                layer_keys(model, b.input_ids, b.attention_mask, layer)

        def fit():
            KeyCovariance(layer, n_tokens=n, seq_len=args.seq_len, batch_size=args.batch_size,
                          progress=False).fit_batches(model, batches)

        def end2end():
            KeyCovariance(layer, n_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                          progress=False).fit(model, docs)

        bare()  # warm-up
        times = _best_times({"full": full, "bare": bare, "keys": keys, "fit": fit, "end2end": end2end}, args.repeats)
        rates = {name: n / t for name, t in times.items()}
        for name, rate in rates.items():
            print(f"{name:>8}: {rate:12.0f} tokens/s")
        print(f"stopped/full forward speed-up: {rates['bare'] / rates['full']:.2f}x")
        print(f"ratio fit/bare: {rates['fit'] / rates['bare']:.3f}")
        print(f"ratio end2end/bare: {rates['end2end'] / rates['bare']:.3f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
