"""The training config: `tree.py` (one typed section per concern, defaults and help lines),
`load.py` (defaults <- YAML <- `--section.key=value`, and back to YAML / MLflow params),
`rules.py` (every rule that spans keys, run once per launch by `validate`), `resume.py` (which
keys a resumed run may change)."""
