"""ROME's reference mode against a plain transcription of kmeng01/rome, on a random GPT-2-small-shape model with
the real GPT-2 tokenizer (issue #13).

For each request: ``ΔW`` of ``ROMEConfig(reference=True)`` and of keyscope's default against the transcription
in ``tests/test_rome.py`` (``_rome_reference``: ``rome_main``/``compute_u``/``compute_v`` written out on the
Hugging Face model and tokenizer), with the same prefixes and the same ``C⁻¹``; the cosine of ``ΔW`` and of the
key-side vectors, and the seconds per edit of each (one run, same machine).

    python benchmarks/bench_rome_reference.py --tokenizer ../shared/data/tokenizer/gpt2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the", "Toko Yasuda", "piano"),
]


def main(argv=None) -> int:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from keyscope import rome
    from keyscope.corpus import documents
    from keyscope.covariance import KeyCovariance
    from keyscope.models import load_model
    from tests.test_rome import _rome_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "tokenizer" / "gpt2"))
    parser.add_argument("--corpus", default="factworld", help="text for C (default: factworld filler)")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="v* steps (ROME's GPT-2 setting: 20)")
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    args = parser.parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        print(f"bench_rome_reference: error: no tokenizer directory at {args.tokenizer}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2-small-random"
        GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tokenizer))).save_pretrained(path)
        tokenizer.save_pretrained(path)
        model = load_model(str(path), device="cpu")
        cov = KeyCovariance(args.layer, n_tokens=args.cov_tokens, seq_len=128, progress=False)
        cov.fit(model, documents(args.corpus))
        cov.cholesky()
        C_inv = torch.linalg.inv(cov.C_ + cov.ridge_ * torch.eye(model.cfg.d_mlp, dtype=torch.float64))
        config = rome.ROMEConfig.for_model(model, reference=True, v_num_grad_steps=args.steps)
        prefixes = rome.context_prefixes(model, config)
        print(f"random GPT-2-small shape, real GPT-2 tokenizer, layer {args.layer}, {len(prefixes)} templates, "
              f"{args.steps} v* steps, C over {args.cov_tokens} tokens of {args.corpus}")
        print(f"{'request':<40}{'ΔW cos ref':>12}{'ΔW cos keyscope':>17}{'u cos keyscope':>16}{'s ref':>8}"
              f"{'s keyscope':>12}{'s transcr.':>12}")
        for template, subject, target in REQUESTS:
            request = rome.EditRequest(template, subject, target)
            start = time.perf_counter()
            reference = rome.compute_edit(model, request, args.layer, cov, config, prefixes=prefixes)
            t_ref = time.perf_counter() - start
            start = time.perf_counter()
            default = rome.compute_edit(model, request, args.layer, cov, replace(config, reference=False),
                                        prefixes=prefixes)
            t_default = time.perf_counter() - start
            start = time.perf_counter()
            expected = _rome_reference(path, {"prompt": template, "subject": subject, "target_new": target},
                                       args.layer, C_inv, prefixes, config)
            t_transcription = time.perf_counter() - start

            def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
                a, b = a.double().flatten(), b.double().flatten()
                return float(a @ b / (a.norm() * b.norm()))

            u_reference = expected[expected.norm(dim=1).argmax()]  # one row of ΔW ∝ u
            print(f"{subject + ' → ' + target:<40}{cosine(reference.delta_W, expected):>12.6f}"
                  f"{cosine(default.delta_W, expected):>17.4f}{abs(cosine(default.key_selector, u_reference)):>16.4f}"
                  f"{t_ref:>8.1f}{t_default:>12.1f}{t_transcription:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
