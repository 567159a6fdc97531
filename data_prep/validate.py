"""`python -m data_prep.validate`: check a split's shards against its manifest; repair them.

    python -m data_prep.validate DIR/train/manifest.json            # exit 1 on any problem
    python -m data_prep.validate DIR/train/manifest.json --repair   # rebuild what is broken

Every shard listed is re-read: its size and sha256, and its tar members parsed (each must
be `<key>.tokens.npy` holding the manifest's dtype and shape, ids below vocab_size), so
the sample and token counts are checked against the manifest too. The document-lengths
sidecar is checked the same way. Every problem is printed on its own line with the file's
name (MISSING, TRUNCATED, SIZE, CORRUPT, UNREADABLE, COUNT, NOLENGTHS); the exit status is
1 if there was any.

`--repair` rebuilds the broken shards and a missing or corrupt `doc_lengths.npy`. A
shard's pack group (its name's `g<N>`) is re-packed from the group's source files, which
must still exist under the input root (the manifest's `settings.input`, or `--input`) with
the sha256 the manifest recorded; the tokenizer must match the manifest's too. The lengths
sidecar needs every group of the split re-packed (its lengths are not in the shards).
Intact shards are not rewritten, the other split is not touched, and a rebuilt file must
come out with the manifest's sha256 (packing is deterministic), otherwise it is not used.
Problems of the manifest itself (its totals disagree with its shards, no lengths record)
cannot be repaired: re-run the sharder. Each problem ends as `REPAIRED <name>` or
`STILL BROKEN <name>: <why>`, and a last line says whether everything was repaired; the
exit status is 0 only then.
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
from data_prep.cli import run_main
from data_prep.groups import GroupJob, pack_groups
from data_prep.manifest import MANIFEST_NAME, load_manifest, sha256_file, shard_path, write_lengths

_GROUP = re.compile(r"-g(\d+)-\d+\.tar$")
# Problems of the manifest itself (its doc_lengths record, its totals): not repairable.
MANIFEST_KEYS = (f"{MANIFEST_NAME} (doc_lengths record)", f"{MANIFEST_NAME} (totals)")


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


def validate(manifest_path: str) -> tuple[dict, dict[str, str]]:
    """(manifest, {name: problem}): a shard's name, the lengths sidecar's, or MANIFEST_KEYS'."""
    manifest = load_manifest(manifest_path)
    problems = {}
    for record in manifest["shards"]:
        problem = check_shard(shard_path(manifest_path, record), record, manifest)
        if problem:
            problems[record["name"]] = problem
    lengths = manifest.get("doc_lengths")
    if lengths is None:
        problems[MANIFEST_KEYS[0]] = ("NOLENGTHS manifest: it records no doc_lengths (made by an older "
                                      "data_prep): re-run python -m data_prep.shard")
    else:
        path = shard_path(manifest_path, lengths)
        if not os.path.isfile(path):
            problems[lengths["name"]] = f"MISSING {lengths['name']}: the document lengths sidecar is not on disk"
        elif os.path.getsize(path) != lengths["bytes"] or sha256_file(path) != lengths["sha256"]:
            problems[lengths["name"]] = f"CORRUPT {lengths['name']}: size or sha256 differs from the manifest"
        if lengths["count"] != manifest["documents"]:
            problems[MANIFEST_KEYS[0]] = (f"COUNT manifest: doc_lengths records {lengths['count']} lengths for "
                                          f"{manifest['documents']} documents")
    totals = (sum(s["samples"] for s in manifest["shards"]), sum(s["tokens"] for s in manifest["shards"]))
    if totals != (manifest["total_samples"], manifest["total_tokens"]):
        problems[MANIFEST_KEYS[1]] = (f"COUNT manifest: shards add up to {totals[0]} samples / {totals[1]} tokens, "
                                      f"totals say {manifest['total_samples']} / {manifest['total_tokens']}")
    return manifest, problems


def repair(manifest_path: str, manifest: dict, broken: list[str], input_spec: str | None = None,
           workers: int | None = None) -> dict[str, str]:
    """Rebuild the `broken` files from their sources; return {name: why it was not repaired}."""
    from data_prep.encode import Encoder, default_workers
    from data_prep.shard import Settings
    from data_prep.tokenizer import load_tokenizer

    failures = {name: "a problem of the manifest itself: re-run python -m data_prep.shard"
                for name in broken if name in MANIFEST_KEYS}
    files = [name for name in broken if name not in MANIFEST_KEYS]
    if not files:
        return failures
    settings = Settings(**manifest["settings"])
    tokenizer = load_tokenizer(settings.tokenizer)
    if tokenizer.describe() != manifest["tokenizer"]:
        why = (f"tokenizer {settings.tokenizer} is not the one the manifest was made with "
               f"({manifest['tokenizer']})")
        return {**failures, **{name: why for name in files}}
    on_disk = {s.name: s for s in corpus.list_sources(input_spec or settings.input)}
    lengths_name = (manifest.get("doc_lengths") or {}).get("name")
    all_groups = sorted({s["group"] for s in manifest["sources"] if "group" in s})
    # A shard needs its own group's sources; the lengths sidecar needs every group's.
    needs = {name: all_groups if name == lengths_name else [_group_of(name)] for name in files}
    recorded = {g: [s for s in manifest["sources"] if s.get("group") == g] for gs in needs.values() for g in gs}
    blocked = {g: problem for g in recorded if (problem := _sources_problem(recorded[g], on_disk, g))}
    for name, groups in needs.items():
        if not groups or any(g in blocked for g in groups):
            failures[name] = (blocked[next(g for g in groups if g in blocked)] if groups
                              else "the manifest does not say which sources fed its pack groups")
    todo = [name for name in files if name not in failures]
    groups = sorted({g for name in todo for g in needs[name]})
    jobs = [GroupJob(g, [on_disk[s["name"]] for s in recorded[g]],
                     {s["name"]: s for s in manifest["shards"] if _group_of(s["name"]) == g},
                     splits=(manifest["split"],)) for g in groups]
    if jobs:
        with Encoder(tokenizer, workers or default_workers()) as encoder:
            failures.update(_rebuild(manifest_path, manifest, jobs, settings, tokenizer, encoder,
                                     lengths_name in todo))
    return failures


def _rebuild(manifest_path: str, manifest: dict, jobs: list[GroupJob], settings, tokenizer, encoder,
             lengths: bool) -> dict[str, str]:
    """Re-pack `jobs` (rewriting their broken shards), then the lengths sidecar if `lengths`."""
    split = manifest["split"]
    output = os.path.dirname(os.path.dirname(os.path.abspath(manifest_path)))
    # The sources are the bytes that were sharded (sha256 checked), so a bad document in them
    # was skipped then: the sharding succeeded and wrote this manifest.
    on_bad = {"on_bad_utf8": "skip", "on_bad_json": "skip"}
    failures, parts = {}, {}
    for job, result in pack_groups(jobs, settings, tokenizer, encoder, output, on_bad=on_bad):
        rebuilt = {r["name"]: r for r in result["splits"][split]["shards"]}
        parts[job.index] = result["splits"][split]["lengths"]
        for name, record in job.done.items():
            if rebuilt.get(name) != record:
                failures[name] = ("the repair gave other bytes than the manifest records (different code or "
                                  "inputs): re-run python -m data_prep.shard")
    if lengths:
        problem = _write_lengths(manifest_path, manifest["doc_lengths"], [parts[g] for g in sorted(parts)])
        if problem:
            failures[manifest["doc_lengths"]["name"]] = problem
    return failures


def _write_lengths(manifest_path: str, record: dict, parts: list[np.ndarray]) -> str | None:
    """Write the rebuilt lengths in place if they are the recorded bytes; else say why not."""
    path = shard_path(manifest_path, record)
    tmp = os.path.join(os.path.dirname(path), f".{record['name']}.repair")
    rebuilt = write_lengths(tmp, parts, sum(len(p) for p in parts))
    if {**rebuilt, "name": record["name"]} != record:
        os.remove(tmp)
        return ("the rebuilt document lengths differ from the manifest's record (different code or inputs): "
                "re-run python -m data_prep.shard")
    os.replace(tmp, path)
    return None


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
    p.add_argument("--repair", action="store_true",
                   help="rebuild broken shards and a missing or corrupt doc_lengths.npy from their sources")
    p.add_argument("--input", default=None, help="where the sources are now, if not the manifest's "
                   "settings.input (same relative names)")
    p.add_argument("--workers", type=int, default=None, help="tokenization processes for --repair")
    args = p.parse_args(argv)
    manifest, problems = validate(args.manifest)
    for line in problems.values():
        print(line)
    shards = sum(name not in MANIFEST_KEYS and name != manifest.get("doc_lengths", {}).get("name")
                 for name in problems)
    print(f"{args.manifest}: {len(manifest['shards'])} shards checked, {shards} broken, "
          f"{len(problems) - shards} other problems")
    if not args.repair or not problems:
        return 1 if problems else 0
    failures = repair(args.manifest, manifest, list(problems), args.input, args.workers)
    _, still = validate(args.manifest)
    for name in dict.fromkeys([*problems, *still]):
        if name in still:
            print(f"STILL BROKEN {name}: " + (f"cannot repair: {failures[name]}" if name in failures else still[name]))
        else:
            print(f"REPAIRED {name}")
    if still:
        print(f"{args.manifest}: repair incomplete, {len(still)} of {len(problems)} problems remain "
              f"({', '.join(still)})")
        return 1
    print(f"{args.manifest}: all {len(problems)} problems repaired; it validates clean")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m data_prep.validate"))
