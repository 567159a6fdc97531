"""`python -m data_prep.validate`: check a split's shards against its manifest; repair them.

    python -m data_prep.validate DIR/train/manifest.json            # exit 1 on any problem
    python -m data_prep.validate DIR/train/manifest.json --repair   # rebuild broken shards

Every shard listed is re-read: its size and sha256, and its tar members parsed (each must
be `<key>.tokens.npy` holding the manifest's dtype and shape, ids below vocab_size), so
the sample and token counts are checked against the manifest too. The document-lengths
sidecar is checked the same way. Every problem is printed on its own line with the file's
name (MISSING, TRUNCATED, SIZE, CORRUPT, UNREADABLE, COUNT); the exit status is 1 if there
was any.

`--repair` rebuilds only the broken shards. A shard's pack group (its name's `g<N>`) is
re-packed from the group's source files, which must still exist under the input root (the
manifest's `settings.input`, or `--input`) with the sha256 the manifest recorded; the
tokenizer must match the manifest's too. Intact shards are not rewritten, the other split
is not touched, and a rebuilt shard must come out with the manifest's sha256 (packing is
deterministic), otherwise the repair fails and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import tarfile

import numpy as np

from data_prep import corpus
from data_prep.manifest import load_manifest, sha256_file, shard_path

_GROUP = re.compile(r"-g(\d+)-\d+\.tar$")


def check_shard(path: str, record: dict, manifest: dict) -> str | None:
    """None if the shard at `path` is exactly what `record` says, else the problem in words."""
    name = record["name"]
    if not os.path.isfile(path):
        return f"MISSING {name}: listed in the manifest but not on disk"
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < record["bytes"]:
        return f"TRUNCATED {name}: {len(data)} of {record['bytes']} bytes"
    if len(data) != record["bytes"]:
        return f"SIZE {name}: {len(data)} bytes, the manifest says {record['bytes']}"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        detail = _parse_problem(data, record, manifest)
        return f"CORRUPT {name}: sha256 differs from the manifest" + (f" ({detail})" if detail else "")
    problem = _parse_problem(data, record, manifest)
    return f"UNREADABLE {name}: {problem}" if problem else None


def _parse_problem(data: bytes, record: dict, manifest: dict) -> str | None:
    """Parse the tar; say what is wrong with its samples, or None."""
    sample_len, dtype = manifest["sample_len"], np.dtype(manifest["dtype"])
    tokens = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if not member.name.endswith(".tokens.npy") or "." in member.name[:-len(".tokens.npy")]:
                    return f"unexpected member {member.name!r}"
                array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                if array.shape != (sample_len,) or array.dtype != dtype:
                    return f"{member.name} holds {array.dtype}{list(array.shape)}, expected {dtype}[{sample_len}]"
                tokens.append(array)
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        return f"cannot parse: {e}"
    if len(tokens) != record["samples"] or len(tokens) * sample_len != record["tokens"]:
        return f"{len(tokens)} samples / {len(tokens) * sample_len} tokens, the manifest says " \
               f"{record['samples']} / {record['tokens']}"
    if tokens and int(np.max(tokens)) >= manifest["tokenizer"]["vocab_size"]:
        return f"token id {int(np.max(tokens))} >= vocab_size {manifest['tokenizer']['vocab_size']}"
    return None


def validate(manifest_path: str) -> tuple[dict, dict[str, str], list[str]]:
    """(manifest, {shard name: problem}, other problems)."""
    manifest = load_manifest(manifest_path)
    broken = {}
    for record in manifest["shards"]:
        problem = check_shard(shard_path(manifest_path, record), record, manifest)
        if problem:
            broken[record["name"]] = problem
    other = []
    lengths = manifest.get("doc_lengths")
    if lengths is None:
        other.append("NOLENGTHS: the manifest records no doc_lengths (made by an older data_prep)")
    else:
        path = shard_path(manifest_path, lengths)
        if not os.path.isfile(path):
            other.append(f"MISSING {lengths['name']}: the document lengths sidecar is not on disk")
        elif os.path.getsize(path) != lengths["bytes"] or sha256_file(path) != lengths["sha256"]:
            other.append(f"CORRUPT {lengths['name']}: size or sha256 differs from the manifest")
        elif lengths["count"] != manifest["documents"]:
            other.append(f"COUNT {lengths['name']}: {lengths['count']} lengths for {manifest['documents']} documents")
    totals = (sum(s["samples"] for s in manifest["shards"]), sum(s["tokens"] for s in manifest["shards"]))
    if totals != (manifest["total_samples"], manifest["total_tokens"]):
        other.append(f"COUNT manifest: shards add up to {totals[0]} samples / {totals[1]} tokens, "
                     f"totals say {manifest['total_samples']} / {manifest['total_tokens']}")
    return manifest, broken, other


def repair(manifest_path: str, manifest: dict, broken: list[str], input_spec: str | None = None,
           workers: int | None = None) -> list[str]:
    """Rebuild the `broken` shards from their sources; return what could not be repaired."""
    from data_prep.encode import Encoder, default_workers
    from data_prep.groups import GroupJob, pack_groups
    from data_prep.shard import Settings
    from data_prep.tokenizer import load_tokenizer

    settings = Settings(**manifest["settings"])
    tokenizer = load_tokenizer(settings.tokenizer)
    if tokenizer.describe() != manifest["tokenizer"]:
        return [f"cannot repair: tokenizer {settings.tokenizer} is not the one the manifest was made "
                f"with ({manifest['tokenizer']})"]
    split, output = manifest["split"], os.path.dirname(os.path.dirname(os.path.abspath(manifest_path)))
    on_disk = {s.name: s for s in corpus.list_sources(input_spec or settings.input)}
    jobs, failures = [], []
    for g in sorted({int(_GROUP.search(name).group(1)) for name in broken}):
        recorded = [s for s in manifest["sources"] if s.get("group") == g]
        problem = _sources_problem(recorded, on_disk, g)
        if problem:
            failures += [f"cannot repair {name}: {problem}" for name in broken if _group_of(name) == g]
            continue
        done = {s["name"]: s for s in manifest["shards"] if _group_of(s["name"]) == g}
        jobs.append(GroupJob(g, [on_disk[s["name"]] for s in recorded], done, splits=(split,)))
    with Encoder(tokenizer, workers or default_workers()) as encoder:
        for job, result in pack_groups(jobs, settings, tokenizer, encoder, output):
            rebuilt = {r["name"]: r for r in result["splits"][split]["shards"]}
            for name, record in job.done.items():
                if rebuilt.get(name) != record:
                    failures.append(f"repair of {name} gave other bytes than the manifest records "
                                    "(different code or inputs): re-run python -m data_prep.shard")
    return failures


def _group_of(shard_name: str) -> int:
    return int(_GROUP.search(shard_name).group(1))


def _sources_problem(recorded: list[dict], on_disk: dict, g: int) -> str | None:
    if not recorded:
        return f"the manifest does not say which sources fed pack group {g} (made by an older data_prep)"
    for source in recorded:
        found = on_disk.get(source["name"])
        if found is None:
            return f"source {source['name']} of pack group {g} is gone"
        if found.size != source["size"] or sha256_file(found.path) != source["sha256"]:
            return f"source {found.path} of pack group {g} changed since sharding (size or sha256)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.validate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="a split's manifest.json (DIR/train/manifest.json)")
    p.add_argument("--repair", action="store_true", help="rebuild broken shards from their sources")
    p.add_argument("--input", default=None, help="where the sources are now, if not the manifest's "
                   "settings.input (same relative names)")
    p.add_argument("--workers", type=int, default=None, help="tokenization processes for --repair")
    args = p.parse_args(argv)
    manifest, broken, other = validate(args.manifest)
    for line in [*broken.values(), *other]:
        print(line)
    print(f"{args.manifest}: {len(manifest['shards'])} shards checked, {len(broken)} broken, "
          f"{len(other)} other problems")
    if not args.repair or not broken:
        return 1 if broken or other else 0
    failures = repair(args.manifest, manifest, sorted(broken), args.input, args.workers)
    for line in failures:
        print(line)
    manifest, still, other = validate(args.manifest)
    for name in broken:
        print(f"{'STILL BROKEN' if name in still else 'REPAIRED'} {name}")
    return 1 if still or other or failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
