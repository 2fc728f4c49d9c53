"""The picture of a bench result: quality (KL divergence) against file size and against decode
speed for the precisions, and throughput against parallel sequences for batching.

matplotlib is an optional extra (``infer-cli[plot]``); ``available()`` says whether it imports.
"""

from __future__ import annotations

from pathlib import Path

from infer_cli.bench.measure import median
from infer_cli.errors import BadOption, BrokenInstall

FORMATS = (".png", ".svg")
INSTALL = "pip install 'infer-cli[plot]'"


def check(path: Path) -> None:
    """Refuse a file type we do not draw, or a missing matplotlib, before anything is measured."""
    if Path(path).suffix.lower() not in FORMATS:
        raise BadOption("--plot", str(path), "a file name ending in .png or .svg")
    if not available():
        raise BrokenInstall(f"--plot needs matplotlib, which is not installed: {INSTALL}", INSTALL)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infer_cli.files import atomic_output

    sections = {s["name"]: s for s in doc.get("sections", [])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    name = doc["model"].get("name", "")
    if name.endswith(".gguf"):
        name = Path(name).name
    title = f"{name}: {doc['machine'].get('cpu', '')}"
    fig.suptitle(title, fontsize=11)
    prec = sections.get("precision")
    points = []
    if prec and prec["status"] == "done":
        for r in prec["rows"]:
            m = r["metrics"]
            q = m.get("quality") or {}
            if r.get("skipped") or q.get("kl_mean") is None:
                continue
            points.append((r["label"], m.get("size", 0) / (1 << 20), median(m.get("decode_tps")), q["kl_mean"]))
    for ax, xi, xlabel in ((axes[0], 1, "file size (MiB)"), (axes[1], 2, "decode tokens/s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL divergence (mean)")
        if not points:
            _empty(ax, "precision not measured")
            continue
        for p in points:
            if p[xi] is None:
                continue
            ax.scatter(p[xi], p[3], color="tab:blue")
            ax.annotate(p[0], (p[xi], p[3]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title("quality against " + ("size" if xi == 1 else "speed"), fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[2]
    batch = sections.get("batching")
    pts = []
    if batch and batch["status"] == "done":
        for r in batch["rows"]:
            m = r["metrics"]
            if not r.get("skipped") and median(m.get("throughput_tps")):
                pts.append((int(r["label"]), median(m["throughput_tps"]), median(m.get("per_sequence_tps"))))
    ax.set_xlabel("parallel sequences")
    ax.set_ylabel("tokens/s")
    if pts:
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="total")
        ax.plot([p[0] for p in pts], [p[2] or 0 for p in pts], marker="s", label="per sequence")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[0] for p in pts], [str(p[0]) for p in pts])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("batching throughput", fontsize=10)
    else:
        _empty(ax, "batching not measured")
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])
