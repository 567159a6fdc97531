"""Data preparation: from text files to packed webdataset token shards.

- `corpus`: where documents come from (a folder or glob of input files, a HF `datasets`
  save_to_disk folder, or the running Python's standard library as a network-free
  default), which split each document belongs to, and how work is divided.
- `readers`: streaming readers for .txt, .jsonl(.gz/.zst), .parquet and .arrow.
- `tokenizer`: one small interface over byte-level, HF `tokenizers` and SentencePiece.
- `train_tokenizer`: `python -m data_prep.train_tokenizer` trains a byte-level BPE.
- `shard`: `python -m data_prep.shard` packs documents into samples of seq_len+1 tokens
  and writes tar shards plus a JSON manifest per split; `encode` (worker processes) and
  `groups` (the ordered read -> tokenize -> pack -> write loop) do the work, `pack` the
  packing and tar writing.
- `validate`: `python -m data_prep.validate` checks shards against a manifest, `--repair`s them.
- `stats`: `python -m data_prep.stats` prints document-length statistics and a histogram.
- `cli`: `run_main`, how every command ends on bad input (one line naming the file, exit 2).
- `manifest`: the manifest format, shared with the training loaders (`pipeline/data/loader.py`,
  `pipeline/data/blend.py`).
"""
