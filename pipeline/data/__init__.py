"""Training and validation batches: `loader.py` (one manifest's resumable, data-parallel order),
`blend.py` (several manifests mixed in fixed proportions), `inputs.py` (the manifests a run
reads, checked before any process group exists, and the loaders built from the data section)."""
