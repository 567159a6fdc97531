"""Checkpoints: `files.py` (atomic, verified, rotating step folders; weights-only loading),
`zero_files.py` (DeepSpeed's ZeRO files inside them), `shards.py` (which file each rank writes
and reads; resharding to other TP/PP sizes), `resume.py` (which checkpoint a run resumes from),
`whole_model.py` (any training layout's checkpoint as one whole TP=1 model in one process, for
generation, evaluation and Hugging Face export)."""
