"""Data preparation: from text files to packed webdataset token shards.

- `corpus`: where documents come from (a folder or glob of .txt/.jsonl files, or the
  running Python's standard library as a network-free default) and which split each
  document belongs to.
- `tokenizer`: one small interface over byte-level, HF `tokenizers` and SentencePiece.
- `train_tokenizer`: `python -m data_prep.train_tokenizer` trains a byte-level BPE.
- `shard`: `python -m data_prep.shard` packs documents into samples of seq_len+1 tokens
  and writes tar shards plus a JSON manifest per split.
- `manifest`: the manifest format, shared with the training loader (`pipeline/data.py`).
"""
