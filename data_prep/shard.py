"""`python -m data_prep.shard`: text files -> packed token shards + manifests.

    python -m data_prep.shard --input stdlib --tokenizer byte --seq-len 512 --output data/stdlib-byte-512
    # in parallel, e.g. one Slurm array task each, then join:
    python -m data_prep.shard ... --num-tasks 3 --task-index 0   # and 1, 2
    python -m data_prep.shard --merge --output DIR

Output:
    DIR/train/{*.tar, doc_lengths.npy, manifest.json}   DIR/valid/{... the same}
    DIR/_state/settings.json           the options the folder was made with
    DIR/_state/group-NNNNNN.json       record of a finished pack group (its shards, sources)
    DIR/_state/group-NNNNNN.<split>.lengths.npy          its documents' token counts
    DIR/_state/group-NNNNNN.progress.jsonl   shards finished so far in an unfinished group
    DIR/_state/task-IIIII-of-NNNNN.json      per-task partial manifest (its groups)

How the work is cut (see `corpus`): input files are grouped into pack groups of at
least `--group-bytes`; each group is packed on its own and named by its index, so shard
names, keys and bytes do not depend on `--num-tasks`: a 3-task run plus merge gives the
same files as a 1-task run. Re-running skips every group whose record matches the current
input files and whose shards are intact, and inside an interrupted group does not rewrite
shards already recorded as finished. With one task the merge runs at the end; with
several, run `--merge` once all tasks are done. Manifests are written last and atomically.

Inside a task, `--workers` processes tokenize (`encode`, `groups`); results are packed in
input order, so the files are the same bytes for any worker count. Input formats:
`readers`. Check a finished folder with `python -m data_prep.validate DIR/train/manifest.json`,
look at it with `python -m data_prep.stats DIR/train/manifest.json`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import asdict, dataclass

from tqdm import tqdm

from data_prep import corpus
from data_prep.cli import run_main
from data_prep.encode import Encoder, default_workers
from data_prep.groups import GroupJob, pack_groups
from data_prep.manifest import (MANIFEST_NAME, build_manifest, read_json, write_json_atomic,
                                write_lengths, write_manifest)
from data_prep.pack import ProgressLog, samples_for_megabytes, shard_intact
from data_prep.readers import BAD_INPUT_POLICIES, INPUT_SUFFIXES, SKIP_KINDS
from data_prep.tokenizer import Tokenizer, load_tokenizer, token_dtype

STATE_DIR = "_state"
LENGTHS_NAME = "doc_lengths.npy"
DEFAULT_SAMPLES_PER_SHARD = 256
DEFAULT_VALID_FRACTION = 0.02
DEFAULT_GROUP_BYTES = 64 << 20


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes (besides the input files themselves)."""

    input: str
    tokenizer: str
    seq_len: int
    text_field: str = "text"
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    valid_fraction: float = DEFAULT_VALID_FRACTION
    group_bytes: int = DEFAULT_GROUP_BYTES

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"--seq-len must be positive, got {self.seq_len}")
        if self.samples_per_shard <= 0:
            raise ValueError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in (0, 1), got {self.valid_fraction}")
        if self.group_bytes <= 0:
            raise ValueError(f"--group-bytes must be positive, got {self.group_bytes}")


def run_task(settings: Settings, output: str, num_tasks: int = 1, task_index: int = 0,
             progress: bool | None = None, workers: int | None = None, on_bad_utf8: str = "error",
             on_bad_json: str = "error") -> dict:
    """Shard this task's pack groups; write its partial manifest; merge if it is the only task.

    Returns the task manifest. `progress=None` shows tqdm bars only on a terminal.
    `workers` (default: all cores) tokenize in parallel; the output does not depend on it.
    `on_bad_utf8` / `on_bad_json`: 'error' or 'skip' a bad document (see `readers`).
    """
    settings.validate()
    if num_tasks < 1:
        raise ValueError(f"--num-tasks must be at least 1, got {num_tasks}")
    tokenizer = load_tokenizer(settings.tokenizer)
    groups = corpus.group_sources(corpus.list_sources(settings.input), settings.group_bytes)
    mine = corpus.task_slice(len(groups), num_tasks, task_index)
    state = _prepare_output(output, settings, tokenizer)

    records, jobs = {}, []
    for g in mine:
        header = _group_header(g, groups[g], state)
        if _group_done(_record_path(output, g), header, output):
            records[g] = read_json(_record_path(output, g))
        else:
            log = ProgressLog(os.path.join(output, STATE_DIR, f"group-{g:06d}.progress.jsonl"), header)
            done = log.load()
            log.start(done)
            jobs.append((GroupJob(g, groups[g], done, log.append), log, header))
    nbytes = sum(s.size for g in mine for s in groups[g])
    with tqdm(total=nbytes, unit="B", unit_scale=True, disable=_no_bar(progress),
              desc=f"task {task_index}/{num_tasks}") as bar, \
            Encoder(tokenizer, workers or default_workers()) as encoder:
        bar.update(sum(s.size for g in records for s in groups[g]))
        by_index = {job.index: (log, header) for job, log, header in jobs}
        on_bad = {"on_bad_utf8": on_bad_utf8, "on_bad_json": on_bad_json}
        for job, result in pack_groups([j for j, _, _ in jobs], settings, tokenizer, encoder, output,
                                       bar, on_bad):
            log, header = by_index[job.index]
            records[job.index] = _finish_group(job.index, header, result, output)
            log.remove()
    task = {"settings": state, "num_groups": len(groups), "num_tasks": num_tasks,
            "task_index": task_index, "groups": [records[g] for g in mine]}
    write_json_atomic(os.path.join(output, STATE_DIR, _task_file(task_index, num_tasks)), task)
    if num_tasks == 1:
        merge(output)
    return task


def _record_path(output: str, g: int) -> str:
    return os.path.join(output, STATE_DIR, f"group-{g:06d}.json")


def _lengths_path(output: str, g: int, split: str) -> str:
    return os.path.join(output, STATE_DIR, f"group-{g:06d}.{split}.lengths.npy")


def _group_header(g: int, sources: list[corpus.SourceFile], state: dict) -> dict:
    return {"group": g, "settings": state, "sources": [s.record() for s in sources]}


def _finish_group(g: int, header: dict, result: dict, output: str) -> dict:
    """Save the group's document lengths and its record (last, atomically)."""
    for where in result["bad_locations"]:
        print(f"warning: skipped {where}", file=sys.stderr)
    splits = {}
    for split, part in result["splits"].items():
        lengths = write_lengths(_lengths_path(output, g, split), [part["lengths"]], len(part["lengths"]))
        splits[split] = {**{k: v for k, v in part.items() if k != "lengths"}, "doc_lengths": lengths}
    record = {**header, "sources": result["sources"], "splits": splits}
    write_json_atomic(_record_path(output, g), record)
    return record


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _task_file(task_index: int, num_tasks: int) -> str:
    return f"task-{task_index:05d}-of-{num_tasks:05d}.json"


def _prepare_output(output: str, settings: Settings, tokenizer: Tokenizer) -> dict:
    """Create the folders; refuse a folder made with other settings (it would mix datasets)."""
    for sub in (*corpus.SPLITS, STATE_DIR):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    state = {"settings": asdict(settings), "tokenizer": tokenizer.describe(),
             "dtype": token_dtype(tokenizer.vocab_size).name}
    path = os.path.join(output, STATE_DIR, "settings.json")
    if os.path.exists(path):
        old = read_json(path)
        if old != state:
            diff = {k: (old["settings"].get(k), v) for k, v in state["settings"].items()
                    if old["settings"].get(k) != v}
            raise ValueError(f"output {output} was made with different settings "
                             f"{diff or '(tokenizer file changed)'} (old, new): use a new --output or delete it")
    else:
        write_json_atomic(path, state)
    return state


def _group_done(record_path: str, header: dict, output: str) -> bool:
    """A finished record for the same settings and unchanged files, with intact shards."""
    if not os.path.exists(record_path):
        return False
    record = read_json(record_path)
    stat_only = [{k: s[k] for k in ("name", "size", "mtime_ns")} for s in record["sources"]]
    if record["settings"] != header["settings"] or stat_only != header["sources"]:
        return False
    if any("doc_lengths" not in part or "skipped_documents" not in part for part in record["splits"].values()):
        return False  # recorded by an older version: rebuild (intact shards are kept)
    return all(shard_intact(_lengths_path(output, record["group"], split), part["doc_lengths"])
               and all(shard_intact(os.path.join(output, split, shard["name"]), shard) for shard in part["shards"])
               for split, part in record["splits"].items())


def merge(output: str, num_tasks: int | None = None) -> dict[str, str]:
    """Join the task manifests into DIR/train/manifest.json and DIR/valid/manifest.json."""
    state_dir = os.path.join(output, STATE_DIR)
    settings_path = os.path.join(state_dir, "settings.json")
    if not os.path.exists(settings_path):
        raise ValueError(f"{output} has no {STATE_DIR}/settings.json: run the shard tasks first")
    state = read_json(settings_path)
    tasks = _load_tasks(state_dir, num_tasks)
    groups = _groups_in_order(tasks, state, output)
    manifests = {split: _split_manifest(split, groups, state, output) for split in corpus.SPLITS}
    _check_enough(manifests, state)
    paths = {}
    for split, manifest in manifests.items():
        paths[split] = os.path.join(output, split, MANIFEST_NAME)
        write_manifest(paths[split], manifest)
    return paths


def _load_tasks(state_dir: str, num_tasks: int | None) -> list[dict]:
    files = sorted(glob.glob(os.path.join(state_dir, "task-*-of-*.json")))
    counts = sorted({int(f.rsplit("-of-", 1)[1][:-5]) for f in files})
    if num_tasks is None:
        if len(counts) != 1:
            raise ValueError(f"{state_dir} holds task manifests for --num-tasks {counts or 'none'}: "
                             "pass --num-tasks to say which run to merge")
        num_tasks = counts[0]
    missing = [i for i in range(num_tasks)
               if not os.path.exists(os.path.join(state_dir, _task_file(i, num_tasks)))]
    if missing:
        raise ValueError(f"cannot merge: tasks {missing} of {num_tasks} have not finished "
                         f"(no {state_dir}/{_task_file(missing[0], num_tasks)})")
    return [read_json(os.path.join(state_dir, _task_file(i, num_tasks))) for i in range(num_tasks)]


def _groups_in_order(tasks: list[dict], state: dict, output: str) -> list[dict]:
    """All group records, checked to be from these settings and to cover every group once."""
    num_groups = {t["num_groups"] for t in tasks}
    if len(num_groups) != 1 or any(t["settings"] != state for t in tasks):
        raise ValueError(f"task manifests in {output} disagree (input files or settings changed "
                         "between tasks): re-run the tasks")
    groups = sorted((r for t in tasks for r in t["groups"]), key=lambda r: r["group"])
    if [r["group"] for r in groups] != list(range(num_groups.pop())):
        raise ValueError(f"task manifests in {output} do not cover every pack group once: re-run the tasks")
    for record in groups:
        for split, part in record["splits"].items():
            for shard in part["shards"]:
                path = os.path.join(output, split, shard["name"])
                if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
                    raise ValueError(f"shard {path} is missing or changed since its task wrote it: "
                                     "re-run that task")
    return groups


def _split_manifest(split: str, groups: list[dict], state: dict, output: str) -> dict:
    settings = state["settings"]
    parts = [g["splits"][split] for g in groups]
    lengths = write_lengths(os.path.join(output, split, LENGTHS_NAME),
                            (_load_lengths(output, g["group"], split) for g in groups),
                            sum(p["doc_lengths"]["count"] for p in parts))
    return build_manifest(
        split=split, seq_len=settings["seq_len"], dtype=state["dtype"], tokenizer=state["tokenizer"],
        shards=[s for p in parts for s in p["shards"]],
        documents=sum(p["documents"] for p in parts),
        dropped_tokens=sum(p["dropped_tokens"] for p in parts),
        sources=[s for g in groups for s in g["sources"]], settings=settings, doc_lengths=lengths,
        skipped_documents={kind: sum(p["skipped_documents"][kind] for p in parts) for kind in SKIP_KINDS})


def _load_lengths(output: str, g: int, split: str):
    import numpy as np

    return np.load(_lengths_path(output, g, split))


def _check_enough(manifests: dict[str, dict], state: dict) -> None:
    """Both splits need at least one sample; say how short they fell and what to change."""
    if all(m["documents"] == 0 for m in manifests.values()):
        skipped = {kind: sum(m["skipped_documents"][kind] for m in manifests.values()) for kind in SKIP_KINDS}
        raise ValueError(f"no documents in input {state['settings']['input']!r}: its "
                         f"{len(manifests['train']['sources'])} files hold only empty texts ({skipped['bad_utf8']} "
                         f"skipped as bad UTF-8, {skipped['bad_json']} as bad JSON); check --input and --text-field")
    sample_len = state["settings"]["seq_len"] + 1
    for split, m in manifests.items():
        if m["total_samples"] == 0:
            hint = (" raise --valid-fraction or" if split == "valid" else "") + " add input or lower --seq-len"
            raise ValueError(f"too little data for one {split} sample: {m['documents']} documents gave "
                             f"{m['dropped_tokens']} tokens (with EOD), fewer than seq_len+1={sample_len}"
                             f" in each pack group;{hint}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shard", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Layout and resume rules: see the module docstring (data_prep/shard.py).")
    p.add_argument("--input", help=f"folder or glob of {'/'.join(INPUT_SUFFIXES)} files, a HF datasets "
                   "save_to_disk folder, or 'stdlib' (the running Python's standard library .py files)")
    p.add_argument("--text-field", default="text",
                   help="JSONL field or Parquet/Arrow column holding the text (default: text)")
    add_bad_input_options(p)
    p.add_argument("--tokenizer", help="'byte' (256 ids, EOD = byte 0), a HF tokenizer.json, "
                   "or a SentencePiece .model")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence; samples hold seq_len+1")
    p.add_argument("--output", required=True, help="output folder (gets train/, valid/, _state/)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None,
                      help=f"samples per tar shard (default: {DEFAULT_SAMPLES_PER_SHARD})")
    size.add_argument("--shard-size-mb", type=float, default=None,
                      help="target shard size in MiB instead (converted to whole samples per shard)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenization processes (default: all cores); the output does not depend on it")
    p.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION,
                   help=f"fraction of documents, by stable hash of their id, for validation "
                   f"(default: {DEFAULT_VALID_FRACTION})")
    p.add_argument("--group-bytes", type=int, default=DEFAULT_GROUP_BYTES,
                   help="pack group size in input bytes: the unit of packing and of parallel work "
                   f"(default: {DEFAULT_GROUP_BYTES})")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="split the work into this many tasks (default: 1)")
    p.add_argument("--task-index", type=int, default=0, help="which task this process runs (0-based)")
    p.add_argument("--merge", action="store_true",
                   help="only join the task manifests in --output into the final manifests "
                   "(needs just --output; --num-tasks if several task counts were run)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if not args.merge:
        missing = [f"--{n.replace('_', '-')}" for n in ("input", "tokenizer", "seq_len")
                   if getattr(args, n) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, str] | dict:
    """Run the CLI: the merged manifests' paths (--merge) or the task manifest."""
    args = parse_args(argv)
    if args.merge:
        paths = merge(args.output, args.num_tasks)
        report_skipped({split: read_json(path)["skipped_documents"] for split, path in paths.items()})
        return paths
    samples_per_shard = args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    if args.shard_size_mb is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        samples_per_shard = samples_for_megabytes(args.shard_size_mb, args.seq_len + 1,
                                                  token_dtype(tokenizer.vocab_size))
    settings = Settings(input=args.input, tokenizer=args.tokenizer, seq_len=args.seq_len,
                        text_field=args.text_field, samples_per_shard=samples_per_shard,
                        valid_fraction=args.valid_fraction, group_bytes=args.group_bytes)
    task = run_task(settings, args.output, args.num_tasks or 1, args.task_index,
                    progress=False if args.no_progress else None, workers=args.workers,
                    on_bad_utf8=args.on_bad_utf8, on_bad_json=args.on_bad_json)
    report_skipped({split: {kind: sum(g["splits"][split]["skipped_documents"][kind] for g in task["groups"])
                            for kind in SKIP_KINDS} for split in corpus.SPLITS})
    return task


def add_bad_input_options(p: argparse.ArgumentParser) -> None:
    """--on-bad-utf8 and --on-bad-json, shared with data_prep.train_tokenizer."""
    for flag, what in (("--on-bad-utf8", "a document that is not valid UTF-8"),
                       ("--on-bad-json", "a JSONL line that is not a JSON object")):
        p.add_argument(flag, choices=BAD_INPUT_POLICIES, default="error",
                       help=f"{what}: stop with an error naming its file and line, or skip it, warn and "
                       "count it per split (in the split's manifest.json when sharding) (default: error)")


def report_skipped(counts: dict[str, dict[str, int]]) -> None:
    """Say on stderr how many documents were skipped, per split and kind (if any were)."""
    if any(n for per in counts.values() for n in per.values()):
        parts = ", ".join(f"{split}: {per['bad_utf8']} bad UTF-8, {per['bad_json']} bad JSON"
                          for split, per in counts.items())
        print(f"skipped documents ({parts})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m data_prep.shard"))
