"""factworld facts as CounterFact / REP records, so one loader serves factworld and the real datasets.

Each fact becomes one record of the REP release schema (Yan et al.; CounterFact fields as in EasyEdit) with
the prompt kept as a template:

``case_id``, ``relation_id``, ``prompt`` (with ``{}`` for the subject), ``subject``, ``target_true``,
``target_new`` (a different target of the same relation, drawn with the seed), ``paraphrase_prompts`` (the
relation's other templates, filled), ``neighborhood_prompts`` (other subjects with the same relation and the
same true target: a correct edit leaves them alone), ``locality_ground_truth``, ``subject_rephrase`` (the
ten rephrased forms) with factworld's extras ``subject_rephrase_kind`` and ``subject_rephrase_trained``, and
``similar_subjects`` (the subject's family: different subjects that share words and facts) and
``order_twins`` (subjects whose names are the same words in another order).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from keyscope._infra.atomic import write_text
from keyscope.factworld.world import ALIAS_KINDS, World

N_NEIGHBOURS = 10


def records(world: World, seed: int = 0) -> list[dict]:
    """One record per fact of ``world`` (deterministic under ``seed``)."""
    rng = random.Random(f"export-{seed}")
    by_target: dict[tuple[str, str], list[int]] = {}
    for fact in world.facts:
        by_target.setdefault((fact.relation_id, fact.target), []).append(fact.subject_id)
    twins = _order_twins(world)
    out = []
    for fact in world.facts:
        subject = world.subject(fact.subject_id)
        relation = world.relation(fact.relation_id)
        template, *others = relation.templates
        neighbours = [s for s in by_target[(fact.relation_id, fact.target)] if s != subject.subject_id]
        neighbours = rng.sample(neighbours, min(N_NEIGHBOURS, len(neighbours)))
        out.append(
            {
                "case_id": fact.case_id,
                "relation_id": fact.relation_id,
                "prompt": template,
                "subject": subject.name,
                "target_true": fact.target,
                "target_new": rng.choice([t for t in relation.targets if t != fact.target]),
                "paraphrase_prompts": [t.format(subject.name) for t in others],
                "neighborhood_prompts": [
                    rng.choice(relation.templates).format(world.subject(s).name) for s in neighbours
                ],
                "locality_ground_truth": fact.target,
                "subject_rephrase": list(subject.aliases),
                "subject_rephrase_kind": list(ALIAS_KINDS),
                "subject_rephrase_trained": list(subject.trained),
                "similar_subjects": [world.subject(s).name for s in world.family_members(subject.subject_id)],
                "order_twins": [world.subject(s).name for s in twins[subject.subject_id]],
            }
        )
    return out


def _order_twins(world: World) -> list[list[int]]:
    """Each subject's order twins (same words, another order), in one pass over the world."""
    groups: dict[tuple, list[int]] = {}
    for s in world.subjects:
        groups.setdefault((tuple(sorted(s.words)), s.words[-1]), []).append(s.subject_id)
    return [[t for t in groups[(tuple(sorted(s.words)), s.words[-1])] if t != s.subject_id] for s in world.subjects]


def write(world: World, path: str | Path, seed: int = 0) -> Path:
    """Write :func:`records` as a JSON list, one record per line (atomically: :mod:`keyscope._infra.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records(world, seed))
    return write_text(path, f"[\n{lines}\n]\n")
