"""Hugging Face export of famtron models (issue 16).

`folder.export_hf` / `folder.import_hf` write and read the folder; `convert` maps names, layouts
and config; `tokenizer_files` the tokenizer. `configuration_famtron.py` and `modeling_famtron.py`
are the remote code an export ships verbatim: they import torch and transformers only, so this
package imports nothing on load (importing them must not pull in megatron).
"""
