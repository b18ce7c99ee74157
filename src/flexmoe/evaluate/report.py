"""The demo report: ``report.json`` (numbers), ``report.md`` (tables beside the paper's numbers) and
``report.png`` (per-domain scores per model, readable without the table)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from flexmoe.evaluate.composition import meets_target
from flexmoe.fileio import atomic_write_bytes, write_json

# FlexOlmo paper (arXiv 2507.07024), 4 data sets / 24 tasks, averages (reference/flexolmo-method.md).
PAPER = {
    "public": 36.9,
    "model_soup": 42.2,
    "btm": 43.4,
    "btx": 40.0,
    "flexolmo": 46.7,
    "flexolmo_rt": 47.8,
    "unrestricted_moe": 46.3,
}
ORDER = [
    "public",
    "dense_code",
    "dense_math",
    "dense_legal",
    "model_soup",
    "btm",
    "btx",
    "unrestricted_moe",
    "flexolmo",
    "flexolmo_sequence",
    "flexolmo_rt",
    "flexolmo_calibrated",
    "flexolmo_without_code",
    "flexolmo_without_math",
    "flexolmo_without_legal",
    "flexolmo_rt_without_legal",
    "flexolmo_calibrated_without_legal",
]


COMPOSITION_COLUMNS = ("alone_gain", "retention", "oracle_retention", "optout_removed", "max_other_change")


def _metric(name: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if name in ("max_other_change", "public_change") else f"{value:.2f}"


def _mark(name: str, value) -> str:
    ok = meets_target(name, value)
    return "" if ok is None else (" ok" if ok else " MISS")


def composition_rows(block: dict) -> list[list[str]]:
    """One row per owner (each number with "ok"/"MISS" against the issue's target), then public."""
    rows = []
    for owner, m in block["owners"].items():
        rows.append([owner] + [_metric(k, m.get(k)) + _mark(k, m.get(k)) for k in COMPOSITION_COLUMNS])
    pc = block.get("public_change")
    rows.append(["public change", _metric("public_change", pc) + _mark("public_change", pc)] + [""] * 4)
    return rows


COMPOSITION_TARGETS = (
    "Targets: retention >= 0.90; opt-out removed 0.90-1.10; max other change <= 2%; public change <= 2%. "
    "alone gain = log ppl(anchor) - log ppl(anchor + own expert) on the owner's test split; oracle: "
    "tokens routed by hand to public + own expert."
)


def composition_table(block: dict):
    """The composition block as a rich table (for the terminal)."""
    t = Table(title=f"Composition (routing: {block.get('routing')})", caption=COMPOSITION_TARGETS)
    for c in ("owner", *COMPOSITION_COLUMNS):
        t.add_column(c.replace("_", " "), justify="left" if c == "owner" else "right")
    for row in composition_rows(block):
        t.add_row(*row)
    return t


def composition_markdown(block: dict) -> list[str]:
    lines = [f"## Composition (routing: {block.get('routing')})", ""]
    lines += ["| owner | " + " | ".join(c.replace("_", " ") for c in COMPOSITION_COLUMNS) + " |"]
    lines += ["|" + "---|" * (1 + len(COMPOSITION_COLUMNS))]
    lines += ["| " + " | ".join(r) + " |" for r in composition_rows(block)]
    return lines + ["", COMPOSITION_TARGETS, ""]


def plot_composition(ax, block: dict) -> None:
    """Per owner: retention, opt-out removed and max other change, with the targets as lines."""
    owners = list(block["owners"])
    metrics = (("retention", "tab:green"), ("optout_removed", "tab:blue"), ("max_other_change", "tab:red"))
    width = 0.8 / len(metrics)
    for j, (m, color) in enumerate(metrics):
        vals = [block["owners"][o].get(m) for o in owners]
        xs = [i + j * width for i in range(len(owners))]
        heights = [v if v is not None else 0.0 for v in vals]
        ax.bar(xs, heights, width, color=color, label=m.replace("_", " "))
        for x, h, v in zip(xs, heights, vals, strict=True):
            ax.text(x, h, "n/a" if v is None else f"{v:.2f}", ha="center", fontsize=7)
    targets = (
        (0.9, "--", "retention / opt-out >= 0.90"),
        (1.1, ":", "opt-out <= 1.10"),
        (0.02, "-.", "other change <= 2%"),
    )
    for y, style, label in targets:
        ax.axhline(y, color="black", ls=style, lw=0.8, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(owners))], owners)
    pc = block.get("public_change")
    pc_text = "n/a" if pc is None else f"{100 * pc:+.1f}%"
    ax.set_title(f"Composition ({block.get('routing')}); public change {pc_text}")
    ax.legend(fontsize=7)


HEADLINE_MODELS = ("public", "model_soup", "btm", "btx", "unrestricted_moe", "flexolmo", "flexolmo_sequence")


def task_average(details: dict) -> dict:
    """The average of the headline task scores (%) with a 95% interval: each task's Wilson-sized
    binomial variance, combined as for a mean of independent tasks."""
    ps, var = [], 0.0
    for scores in details.values():
        s = _task_score(scores)
        p, n = s["value"], max(1, s["n"])
        ps.append(p)
        var += p * (1 - p) / n
    if not ps:
        return {"value": None, "ci95": None, "tasks": 0}
    mean, half = sum(ps) / len(ps), 1.96 * var**0.5 / len(ps)
    ci = [100 * max(0.0, mean - half), 100 * min(1.0, mean + half)]
    return {"value": 100 * mean, "ci95": ci, "tasks": len(ps)}


#: FlexOlmo's models in the headline, each compared item by item with every other headline model
FLEXOLMO_MODELS = ("flexolmo", "flexolmo_sequence")


def _task_score(scores: dict) -> dict:
    return scores.get("acc_norm") or scores.get("exact_match")


def paired_difference(tasks_a: dict, tasks_b: dict) -> dict | None:
    """Model a's task average minus model b's (points), with a 95% interval from the per-item
    differences on the same items: narrower than the two averages' intervals suggest, because both
    models find the same items easy or hard. None when a task lacks per-item results in either."""
    means, var = [], 0.0
    for t, scores in tasks_a.items():
        other = _task_score(tasks_b.get(t, {})) or {}
        a, b = _task_score(scores).get("correct"), other.get("correct")
        if a is None or b is None or len(a) != len(b) or not a:
            return None
        d = [x - y for x, y in zip(a, b, strict=True)]
        mean = sum(d) / len(d)
        means.append(mean)
        var += sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1) / len(d)
    if not means:
        return None
    diff, half = sum(means) / len(means), 1.96 * var**0.5 / len(means)
    return {"difference": 100 * diff, "ci95": [100 * (diff - half), 100 * (diff + half)], "tasks": len(means)}


#: the merging baselines of issue 13's target: FlexOlmo above each by more than the interval
MERGING_MODELS = ("model_soup", "btm", "btx")


def merging_verdict(models: dict, model: str) -> str | None:
    """``model`` minus every merging baseline on the same items, and whether it is above each by more
    than the paired 95% interval (its lower end above 0). None without per-item results."""
    tasks = models[model]["details"]["tasks"]
    diffs = {
        b: paired_difference(tasks, models[b]["details"]["tasks"]) for b in MERGING_MODELS if b in models
    }
    if not diffs or None in diffs.values():
        return None
    short = [b for b, v in diffs.items() if v["ci95"][0] <= 0]
    cells = ", ".join(f"{b} {_interval(v['difference'], v['ci95'], '+.1f')}" for b, v in diffs.items())
    verdict = "met" if not short else f"NOT met against {', '.join(short)}"
    return (
        f"{model} minus each merging baseline on the same items (points, paired 95% interval): {cells}. "
        f"Above every one by more than the interval: {verdict}."
    )


def headline(models: dict, costs: dict) -> dict:
    """FlexOlmo against the public model and the baselines: task average and per-task accuracy with
    intervals (Wilson), per-domain perplexity with bootstrap intervals over documents, and inference
    cost per token (``costs[model] = {"forward_passes": k, "flops": f}``)."""
    out = {}
    for m in HEADLINE_MODELS:
        if m not in models or "details" not in models[m]:
            continue
        d = models[m]["details"]
        out[m] = {
            "average": task_average(d["tasks"]),
            "tasks": {t: _score_only(_task_score(s)) for t, s in d["tasks"].items()},
            "perplexity": {
                k: {"value": v["perplexity"], "ci95": v["ci95"], "documents": v.get("documents")}
                for k, v in d["perplexity"].items()
            },
            "cost": costs.get(m),
        }
    for m in FLEXOLMO_MODELS:
        if m in out:
            tasks = models[m]["details"]["tasks"]
            out[m]["versus"] = {
                b: paired_difference(tasks, models[b]["details"]["tasks"])
                for b in out
                if b not in FLEXOLMO_MODELS
            }
    return out


def _score_only(score: dict) -> dict:
    """A task score without its per-item results (those stay in the model's details)."""
    return {k: v for k, v in score.items() if k != "correct"}


def paired_markdown(h: dict) -> list[str]:
    """FlexOlmo minus every other headline model, paired on the same items."""
    rows = [(m, h[m]["versus"]) for m in FLEXOLMO_MODELS if h.get(m, {}).get("versus")]
    if not rows:
        return []
    others = list(rows[0][1])
    lines = ["FlexOlmo minus each model on the same items (task average, points; paired 95% interval):", ""]
    lines += ["| model | " + " | ".join(f"- {b}" for b in others) + " |", "|" + "---|" * (1 + len(others))]
    for m, versus in rows:
        cells = [_interval(v["difference"], v["ci95"], "+.1f") if v else "-" for v in versus.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _interval(value, ci, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{scale * value:{fmt}} [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]"


def headline_markdown(h: dict) -> list[str]:
    first = next(iter(h.values()))
    domains, tasks = list(first["perplexity"]), list(first["tasks"])
    lines = ["## Headline comparison (95% intervals)", ""]
    lines += [
        "| model | average | "
        + " | ".join(f"ppl {d}" for d in domains)
        + " | "
        + " | ".join(tasks)
        + " | forward passes / token | GFLOPs / token |"
    ]
    lines += ["|" + "---|" * (4 + len(domains) + len(tasks))]
    for m, r in h.items():
        a = r["average"]
        cells = [_interval(a["value"], a["ci95"], ".1f")]
        cells += [_interval(p["value"], p["ci95"], ".2f") for p in r["perplexity"].values()]
        cells += [_interval(s["value"], s["ci95"], ".1f", 100) for s in r["tasks"].values()]
        c = r.get("cost") or {}
        cells += [
            str(c.get("forward_passes", "-")),
            f"{c['flops'] / 1e9:.4f}" if c.get("flops") is not None else "-",
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n_items = {t: s["n"] for t, s in first["tasks"].items()}
    docs = {d: p.get("documents") for d, p in first["perplexity"].items()}
    lines += [
        "",
        "Average: mean of the task scores (cloze acc_norm, math exact match), interval from each task's "
        "binomial variance. Tasks: Wilson intervals. Perplexity: percentile bootstrap over test documents. "
        f"Items per task: {n_items}; test documents per domain: {docs}. Cost: dense forward passes and "
        "matmul FLOPs per token (BTM runs every dense model on every token; flexolmo_sequence as scored "
        "here: the anchor, each owner's own model and the MoE pass, while generating costs one MoE pass "
        "per token after the prompt's choice).",
        "",
    ]
    return lines + paired_markdown(h)


def _ordered(models: dict) -> list[str]:
    return [m for m in ORDER if m in models] + sorted(m for m in models if m not in ORDER)


def markdown(report: dict) -> str:
    """The report as markdown: headline comparison, per-domain tables, opt-out, item counts."""
    models, domains = report["models"], report["domains"]
    tasks = list(next(iter(models.values()))["tasks"])
    lines = [f"# flexmoe demo report (preset {report['preset']})", ""]
    lines += [report.get("summary", ""), ""]
    head = (
        "| model | "
        + " | ".join(f"ppl {d}" for d in domains)
        + " | "
        + " | ".join(tasks)
        + " | average | paper |"
    )
    lines += [head, "|" + "---|" * (3 + len(domains) + len(tasks))]
    for m in _ordered(models):
        r = models[m]
        cells = [f"{r['perplexity'][d]:.2f}" for d in domains] + [f"{r['tasks'][t]:.1f}" for t in tasks]
        paper = f"{PAPER[m]:.1f}" if m in PAPER else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r['average']:.1f} | {paper} |")
    lines += [
        "",
        "Perplexity: lower is better (test split). Tasks: accuracy in % (cloze: length-normalised "
        "log-likelihood, 4 choices, chance 25%; math_answer: exact match of generated number). "
        "The paper column is the paper's 24-task average at 7B scale, for orientation only: "
        "scales, data and tasks differ.",
        "",
    ]
    n = report.get("items", {})
    if n:
        lines += [
            "Items per task: "
            + ", ".join(f"{t} {k}" for t, k in n.items())
            + f". A 95% interval on one task at n={min(n.values())} and p=0.5 is about "
            f"+/-{98 / min(n.values()) ** 0.5:.0f} points; see report.json for every interval.",
            "",
        ]
    for key in ("composition", "composition_sequence"):
        if report.get(key):
            lines += composition_markdown(report[key])
    if report.get("headline"):
        lines += headline_markdown(report["headline"])
    for key in ("findings", "opt_out", "router"):
        if report.get(key):
            lines += [f"## {key.replace('_', '-').capitalize()}", ""] + [f"- {x}" for x in report[key]] + [""]
    if report.get("privacy"):
        lines += privacy_markdown(report["privacy"])
    if report.get("seconds"):
        lines += ["## Time per step (seconds)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in report["seconds"].items()] + [""]
    if report.get("environment"):  # CPU numbers move with the processor and the libraries
        env = ", ".join(f"{k} {v}" for k, v in report["environment"].items())
        lines += ["## Environment", "", env, ""]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a reader sees the old figure or the new one) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def plot(report: dict, path: Path) -> None:
    """Grouped bars: per owner domain, the score of each model relative to the public model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, domains = report["models"], report["domains"]
    names = _ordered(models)
    blocks = [report[k] for k in ("composition", "composition_sequence") if report.get(k)]
    fig, axes = plt.subplots(1, 2 + len(blocks), figsize=(7 * (2 + len(blocks)), 5.2))
    width = 0.8 / len(names)
    ax = axes[0]
    for j, m in enumerate(names):
        vals = [models["public"]["perplexity"][d] / models[m]["perplexity"][d] for d in domains]
        ax.bar([i + j * width for i in range(len(domains))], vals, width, label=m)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("perplexity gain over public model (x, higher is better)")
    ax.set_title("Per-domain perplexity, relative to the public model")
    ax = axes[1]
    avgs = [models[m]["average"] for m in names]
    colors = ["tab:green" if m.startswith("flexolmo") and "without" not in m else "tab:gray" for m in names]
    ax.barh(range(len(names)), avgs, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("average task score (%)")
    ax.set_title("Average over downstream tasks")
    for i, v in enumerate(avgs):
        ax.text(v, i, f" {v:.1f}", va="center")
    axes[0].legend(fontsize=7, ncol=2)
    for ax, block in zip(axes[2:], blocks, strict=True):
        plot_composition(ax, block)
    fig.suptitle(f"flexmoe demo ({report['preset']} preset): FlexOlmo vs baselines and opt-out")
    save_figure(fig, Path(path))


def write_report(report: dict, workdir: Path) -> None:
    """Write the three report files into ``workdir``."""
    workdir = Path(workdir)
    slim = {
        **report,
        "models": {m: {k: v for k, v in r.items() if k != "details"} for m, r in report["models"].items()},
    }
    write_json(
        workdir / "report.json",
        {**slim, "details": {m: r.get("details") for m, r in report["models"].items()}},
    )
    atomic_write_bytes(workdir / "report.md", markdown(slim).encode())
    plot(slim, workdir / "report.png")


# --------------------------------------------------------------------------------------------------
# The privacy section (flexmoe.audit.demo computes it)


def privacy_markdown(priv: dict) -> list[str]:
    """The privacy section of report.md."""
    owner = priv["owner"]
    lines = ["## Privacy", ""]
    lines += [
        f"Owner **{owner}** trained DP experts (DP-SGD, Opacus; {priv['settings']['dp_steps']} steps of "
        f"expected batch {priv['settings']['dp_batch_size']}, random router init) besides its ordinary "
        f"expert. Utility: {priv['utility_model']}; epsilon inf is the ordinary FlexOlmo model.",
        "",
        f"| epsilon | spent (delta) | noise multiplier | ppl {owner} | ppl public | {owner}_cloze | "
        f"{owner} loss gain kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps, u in priv["utility"].items():
        dp = priv["dp"].get(f"eps{eps}")
        spent = f"{dp['epsilon']:.2f} ({dp['delta']:.1g})" if dp else "-"
        sigma = f"{dp['noise_multiplier']:.3f}" if dp else "0"
        kept = u.get("owner_loss_gain_kept")
        lines.append(
            f"| {eps} | {spent} | {sigma} | {u['perplexity'][owner]:.2f} | {u['perplexity']['public']:.2f} | "
            f"{u['tasks'][f'{owner}_cloze']:.1f} | {'-' if kept is None else f'{100 * kept:.0f}%'} |"
        )
    audit = priv.get("audit", {})
    if audit:
        cols = sorted({c for a in audit.values() for c in a["summary"]}, key=_col_order)
        lines += ["", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for m, a in audit.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(a["summary"].get(c)) for c in cols) + " |")
        sizes = priv["audit_sizes"]
        ex = sizes["extraction"]
        lines += [
            "",
            f"Exposure (bits; Carlini et al.): mean over canaries repeated x0 (controls, never planted: "
            f"chance, about 1.44), x1, x10, x100 times; rank among {sizes['candidates']} random secrets, "
            f"so at most {_cap(sizes['candidates']):.2f} bits. Membership: loss-attack AUC on "
            f"{sizes['membership_blocks']} training vs as many held-out blocks (0.5 = chance). Extraction: "
            f"share of {ex['documents']} training documents whose {ex['suffix_tokens']}-token continuation "
            f"one of {ex['samples']} samples from a {ex['prefix_tokens']}-token prefix reproduces "
            f"(normalised Levenshtein >= {ex['threshold']}). report.json holds every interval.",
        ]
    if not priv.get("canaries_planted"):
        lines += ["", "Canaries were not planted (this work directory predates the privacy section)."]
    return lines + [""]


def _cap(n: int) -> float:
    return math.log2(n + 1)


def _col_order(c: str) -> tuple:
    if c.startswith("exposure_x"):
        return (0, int(c.removeprefix("exposure_x")))
    return (1, c)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


#: the post-training plot's models: (key in the evaluations, label); ``{d}`` is the domain's owner
POST_TRAINING_BARS = (
    ("anchor_sft", "post-trained anchor"),
    ("{d}-progressive", "owner's expert alone"),
    ("merged", "merged, stock export (rows)"),
    ("merged_sequence", "merged, flexmoe runtime (sequence)"),
    ("oracle_sequence-{d}", "routed by hand (oracle)"),
)


def plot_post_training(evaluations: dict, path: Path) -> None:
    """Grouped bars per domain (public chat, then each owner's tasks): the accuracy of each model of
    ``POST_TRAINING_BARS`` with its 95% Wilson interval (``flexmoe demo --post-train``'s evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = ["public", *sorted({k.split("-", 1)[0] for k in evaluations if k.endswith("-progressive")})]
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(domains), 5))
    width = 0.8 / len(POST_TRAINING_BARS)
    for j, (key, label) in enumerate(POST_TRAINING_BARS):
        xs, ys, errs = [], [], [[], []]
        for i, d in enumerate(domains):
            r = evaluations.get(key.format(d=d), {}).get(d)
            if r is None:  # public chat has no own expert nor oracle
                continue
            lo, hi = r["accuracy_ci"]
            xs.append(i + j * width)
            ys.append(100 * r["accuracy"])
            errs[0].append(100 * (r["accuracy"] - lo))
            errs[1].append(100 * (hi - r["accuracy"]))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("task accuracy (%), 95% Wilson interval")
    ax.set_title("Post-training: each domain's tasks, held out")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
