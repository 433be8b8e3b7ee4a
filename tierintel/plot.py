"""The evaluation plot: RAG vs. the model alone on each answer rule, and recall@5 by question type."""

from __future__ import annotations

from pathlib import Path


def plot_eval(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rules = [("cited_expected", "right ids cited"), ("facts_ok", "EPSS/KEV facts match"),
             ("newer_than_training_cited_expected", "right ids, post-training CVEs")]
    n = result["questions"]
    systems = [("rag", "RAG (tierintel)")] + ([("baseline", "model alone")]
                                               if "baseline" in result else [])
    width = 0.8 / len(systems)
    for i, (key, label) in enumerate(systems):
        values = [result[key][rule] for rule, _ in rules]
        values.append(1 - result[key]["questions_with_invented_ids"] / n)
        left.bar([x + i * width for x in range(len(values))], values, width, label=label)
    left.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(rules) + 1)],
                    [name for _, name in rules] + ["no invented ids"], rotation=15, fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel(f"share of {n} questions")
    left.legend(fontsize=8)
    left.set_title(f"answers ({result['settings']['model']})", fontsize=9)
    by_type = result["retrieval"]["recall@5_by_type"]
    right.bar(list(by_type), list(by_type.values()), color="tab:green")
    right.axhline(0.9, color="grey", linestyle="--", linewidth=1)
    right.set_ylim(0, 1.05)
    right.set_title(f"retrieval recall@5 = {result['retrieval']['recall@5']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
