"""Score a composed model with EleutherAI's lm-evaluation-harness on the demo tasks.

``export_lm_eval`` writes one YAML task config per demo task over local JSONL copies of its items,
plus a group ``flexmoe_demo``, so that the stock harness scores the same items as ``flexmoe eval``:

    lm_eval --model hf --model_args pretrained=MODEL --include_path OUT --tasks flexmoe_demo

Multiple choice (``*_cloze``): context and choice are concatenated without a delimiter, exactly as
flexmoe scores them (``acc`` and byte-normalised ``acc_norm`` differ from the harness's ``acc_norm``,
which normalises by characters). Generative (``math_answer``): greedy until a newline, first number
extracted by a regex filter, then exact match, as ``flexmoe eval`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.evaluate.tasks import load_tasks
from flexmoe.fileio import atomic_dir, claims_output

GROUP = "flexmoe_demo"
NUMBER_REGEX = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?(?:/[0-9]+)?)"


def _yaml(doc: dict) -> str:
    """YAML for the simple, flat task configs below (JSON scalars are valid YAML)."""
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in doc.items())


def task_config(name: str, items_file: Path, generative: bool) -> dict:
    base = {
        "task": f"flexmoe_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(items_file)}},
        "test_split": "test",
    }
    if not generative:
        return {
            **base,
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return {
        **base,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 16},
        "filter_list": [
            {
                "name": "first_number",
                "filter": [
                    {"function": "regex", "regex_pattern": NUMBER_REGEX},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


@claims_output("out")
def export_lm_eval(data: Path, out: Path, force: bool = False) -> list[str]:
    """Write lm-evaluation-harness task configs for the demo tasks of ``data`` into ``out``.

    Returns the task names (plus the group ``flexmoe_demo``)."""
    tasks = load_tasks(data)
    out = Path(out).absolute()
    names = []
    with atomic_dir(out, force=force) as tmp:
        for name, items in tasks.items():
            generative = bool(items) and "choices" not in items[0]
            rows = [
                {**it, "answer": str(it["answer"]).replace(",", "")} if generative else it for it in items
            ]
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            cfg = task_config(name, out / f"{name}.jsonl", generative)
            (tmp / f"flexmoe_{name}.yaml").write_text(_yaml(cfg), encoding="utf-8")
            names.append(cfg["task"])
        group = {"group": GROUP, "task": names}
        (tmp / f"{GROUP}.yaml").write_text(_yaml(group), encoding="utf-8")
    return names
