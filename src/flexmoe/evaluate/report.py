"""The demo report: ``report.json`` (numbers), ``report.md`` (tables beside the paper's numbers) and
``report.png`` (per-domain scores per model, readable without the table)."""

from __future__ import annotations

import math
from pathlib import Path

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
    "flexolmo_rt",
    "flexolmo_calibrated",
    "flexolmo_without_code",
    "flexolmo_without_math",
    "flexolmo_without_legal",
    "flexolmo_rt_without_legal",
    "flexolmo_calibrated_without_legal",
]


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
    for key in ("findings", "opt_out", "router"):
        if report.get(key):
            lines += [f"## {key.replace('_', '-').capitalize()}", ""] + [f"- {x}" for x in report[key]] + [""]
    if report.get("privacy"):
        lines += privacy_markdown(report["privacy"])
    if report.get("seconds"):
        lines += ["## Time per step (seconds)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in report["seconds"].items()] + [""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Grouped bars: per owner domain, the score of each model relative to the public model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, domains = report["models"], report["domains"]
    names = _ordered(models)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
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
    fig.suptitle(f"flexmoe demo ({report['preset']} preset): FlexOlmo vs baselines and opt-out")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), tmp.read_bytes())
    tmp.unlink()


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
