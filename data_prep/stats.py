"""`python -m data_prep.stats`: how long are the documents of a split, in tokens?

    python -m data_prep.stats DIR/train/manifest.json [--block-size 1024] [--histogram out.png]

Prints documents, tokens, document-length percentiles, and the fraction of documents
longer than one FAM block (`--block-size`, the paper's block length C; default 1024) and
than one training sequence (the manifest's seq_len): documents longer than a block are
where FAM's feedback memory has to carry context across blocks. Samples are packed, so
document lengths come from the sidecar the sharder writes (`doc_lengths.npy`, tokens
without EOD), not from the shards. Saves a log-scale length histogram as a PNG (default:
`doc_lengths.png` beside the manifest).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data_prep.cli import run_main
from data_prep.manifest import load_manifest, sha256_file, shard_path

PERCENTILES = (50, 90, 99, 99.9)
DEFAULT_BLOCK_SIZE = 1024


def load_lengths(manifest_path: str, manifest: dict) -> np.ndarray:
    record = manifest.get("doc_lengths")
    if record is None:
        raise ValueError(f"manifest {manifest_path} records no document lengths (made by an older "
                         "data_prep): re-run python -m data_prep.shard")
    path = shard_path(manifest_path, record)
    if not os.path.isfile(path) or sha256_file(path) != record["sha256"]:
        raise ValueError(f"{path} is missing or differs from the manifest: "
                         f"run python -m data_prep.validate {manifest_path}")
    return np.load(path)


def compute(manifest_path: str, block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """The numbers `main` prints, as a dict (also for tests and logging)."""
    manifest = load_manifest(manifest_path)
    lengths = load_lengths(manifest_path, manifest).astype(np.int64)
    n = max(len(lengths), 1)
    return {
        "split": manifest.get("split"), "documents": len(lengths),
        "document_tokens": int(lengths.sum()), "total_tokens": manifest["total_tokens"],
        "total_samples": manifest["total_samples"], "dropped_tokens": manifest["dropped_tokens"],
        "mean": float(lengths.mean()) if len(lengths) else 0.0,
        "percentiles": {p: float(np.percentile(lengths, p)) if len(lengths) else 0.0 for p in PERCENTILES},
        "max": int(lengths.max()) if len(lengths) else 0,
        "block_size": block_size, "seq_len": manifest["seq_len"],
        "longer_than_block": float((lengths > block_size).sum() / n),
        "longer_than_seq_len": float((lengths > manifest["seq_len"]).sum() / n),
        "lengths": lengths,
    }


def save_histogram(stats: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    lengths = np.maximum(stats["lengths"], 1)
    bins = np.logspace(0, np.log10(max(lengths.max(), 10)) + 0.05, 60)  # lengths span decades
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=bins, color="#4472c4")
    ax.set_xscale("log")
    ax.axvline(stats["block_size"], color="#c00000", linestyle="--", label=f"FAM block {stats['block_size']}")
    ax.axvline(stats["seq_len"], color="#70ad47", linestyle=":", label=f"seq_len {stats['seq_len']}")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"{stats['split']}: {stats['documents']:,} documents, median {stats['percentiles'][50]:,.0f} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(stats: dict) -> str:
    pct = ", ".join(f"p{p:g} {v:,.0f}" for p, v in stats["percentiles"].items())
    return "\n".join([
        f"split:        {stats['split']}",
        f"documents:    {stats['documents']:,}",
        f"tokens:       {stats['document_tokens']:,} in documents; {stats['total_tokens']:,} in "
        f"{stats['total_samples']:,} samples (with EOD), {stats['dropped_tokens']:,} dropped",
        f"doc length:   mean {stats['mean']:,.1f}, {pct}, max {stats['max']:,}",
        f"> block {stats['block_size']}:  {100 * stats['longer_than_block']:.2f}% of documents",
        f"> seq_len {stats['seq_len']}: {100 * stats['longer_than_seq_len']:.2f}% of documents",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_prep.stats", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="a split's manifest.json")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"FAM block length C in tokens (default: {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--histogram", default=None,
                   help="PNG to write (default: doc_lengths.png beside the manifest)")
    args = p.parse_args(argv)
    if args.block_size <= 0:
        p.error(f"--block-size must be positive, got {args.block_size}")
    stats = compute(args.manifest, args.block_size)
    print(report(stats))
    path = args.histogram or os.path.join(os.path.dirname(os.path.abspath(args.manifest)), "doc_lengths.png")
    if stats["documents"]:
        save_histogram(stats, path)
        print(f"histogram:    {path}")
    return stats


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m data_prep.stats"))
