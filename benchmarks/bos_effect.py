"""What reading a model with a BOS it was not trained with changes: its known facts and its answers.

The TransformerLens bridge prepends a BOS to every tokenizer; keyscope reads a model as its own tokenizer does
(none for SmolLM2). This measures both readings on the same facts, in one run:

    python benchmarks/bos_effect.py --model smollm2-135m \\
        --data ../shared/data/paraphrases/robustkeyedit_test.counterfact_para_prompt_para_subject_llama2-7b.json \\
        --json figures/smollm2/bos_effect.json

It prints, and writes as JSON, the number of known facts (top-1 = first token of the true target) and the mean
probability of that token, with the model's own tokenisation and with a BOS forced in front, and the first fact's
probability of its true target both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope._infra.atomic import write_text  # noqa: E402
from keyscope.analysis.predictions import next_token_top_k, target_context  # noqa: E402
from keyscope.data.datasets import load_facts  # noqa: E402
from keyscope.model.models import load_model  # noqa: E402


def reading(model, facts, prepend_bos: bool | None) -> dict:
    """Known facts and the true target's first-token probability, under one BOS convention."""
    pairs = [target_context(model.tokenizer, f.filled_prompt, f.target_true, prepend_bos) for f in facts]
    top = next_token_top_k(model, [context for context, _ in pairs], k=1, targets=[first for _, first in pairs])
    known = (top.top1 == top.ids.new_tensor([first for _, first in pairs])).tolist()
    probability = top.target_probabilities.tolist()
    return {"known": int(sum(known)), "mean_true_probability": sum(probability) / len(probability),
            "first_fact_true_probability": probability[0], "first_context": pairs[0][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    facts = [f for f in load_facts(args.data) if f.target_true]
    result = {"model": args.model, "data": Path(args.data).name, "facts": len(facts),
              "own": reading(model, facts, None), "bos": reading(model, facts, True)}
    print(json.dumps(result, indent=2))
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
