"""famtron's model: TransformerFAM on megatron-core.

    from model import build_model
    model = build_model("tiny")                       # single process; no launcher needed
    out = model(tokens, labels=labels)                # tokens [b, s]
    out.loss, out.logits, out.state                   # state: per-layer FAM + memory blocks
    out2 = model(next_tokens, state=out.state)        # streaming: carry the state on
    micro_chunked_forward_backward(model, tokens, labels, chunk_len)  # long sequences (issue 14)

See model/reference.py for the algorithm, written next to the paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

# Notices that megatron-core 0.16.1 and torch 2.13 print about themselves on every import or model
# build, none of which asks famtron to change anything now: optional kernels missing (CPU), megatron's
# own default cuda_graph_scope="full", arguments megatron will require later and for which it uses
# the value we want today (tp_group: the default TP group; ffn_hidden_size: config.ffn_hidden_size),
# its module layout, torch's own use of torch.jit. Matched by message and, where the warning is
# attributed to the library itself, by module; famtron's own warnings stay. pyproject.toml's
# pytest filterwarnings repeats them, as pytest turns DeprecationWarnings back on for each test.
_THIRD_PARTY_NOTICES = [  # (category, message regex, module regex or "" for any)
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\."),
    (UserWarning, r"Apex is not installed", r"megatron\.core\."),
    (UserWarning, r"full scope is deprecated", r"megatron\.core\."),
    (DeprecationWarning, r"Warning: tp_group is None, using default tp group", r"megatron\.core\."),
    (DeprecationWarning, r"MLP requires ffn_hidden_size, but it was not provided", ""),  # megatron's, raised at our call
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed", r"megatron\.core\."),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\."),
]
for category, message, module in _THIRD_PARTY_NOTICES:
    warnings.filterwarnings("ignore", message=message, category=category, module=module)

import torch  # noqa: E402

if not torch.cuda.is_available():  # advice for CUDA streams (slurm/train.sbatch follows it), void on CPU
    warnings.filterwarnings("ignore", message=r"When using async grad allreduce it is recommended to set the "
                            r"environment variable CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning,
                            module=r"megatron\.core\.")

from megatron.core import tensor_parallel  # noqa: E402

from model.cpu_compat import apply_cpu_compat  # noqa: E402
from model.config import FAMConfig, ModelArgs, load_model_args, to_fam_config  # noqa: E402
from model.generation import FAMGenerator, Generation, Sampling, generate  # noqa: E402
from model.groups import single_process_group  # noqa: E402
from model.init import init_parameters_  # noqa: E402
from model.language_model import FAMLanguageModel, ModelOutput  # noqa: E402
from model.micro_chunks import micro_chunked_forward_backward  # noqa: E402
from model.state import FAMState, LayerState  # noqa: E402


@dataclass(frozen=True)
class ModelPart:
    """What one FAMLanguageModel holds: its layers, and the embedding with FAM prompt (`first`)
    and the final norm with output layer (`last`). The whole model is one part of every layer."""

    layers: range
    first: bool = True
    last: bool = True


def build_model(
    args: ModelArgs | str,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 1234,
    sequence_parallel: bool = False,
    tp_group=None,
    **overrides,
) -> FAMLanguageModel:
    """This rank's shard of the whole FAM language model. `args` is ModelArgs or a config
    name/path (`overrides` replace its model keys). `tp_group`: the tensor-parallel group (a
    launcher's, pipeline/parallel/groups.py); None: this process alone (model/groups.py)."""
    if not isinstance(args, ModelArgs):
        args = load_model_args(args, **overrides)
    whole = ModelPart(range(args.num_layers))
    return build_model_parts(args, [whole], params_dtype=params_dtype, device=device, seed=seed,
                             sequence_parallel=sequence_parallel, tp_group=tp_group)[0]


def build_model_parts(args: ModelArgs, parts: list[ModelPart], *, params_dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None, seed: int = 1234, sequence_parallel: bool = False,
                      tp_group=None, pipeline_parallel_size: int = 1) -> list[FAMLanguageModel]:
    """The one model builder, for the whole model (one part) and for pipeline stages (this rank's
    parts): config -> seed -> construct -> initial weights. Weights are drawn on `device` from
    `seed` and each parameter's global name (model/init.py), so every TP size and pipeline split
    starts from the same model, and a rank builds and draws only its own parts."""
    apply_cpu_compat()
    tp_group = single_process_group() if tp_group is None else tp_group
    tp_rank, tp_size = tp_group.rank(), tp_group.size()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = to_fam_config(args, tp_size, pipeline_parallel_size, params_dtype, sequence_parallel,
                           cpu_initialization=device.type == "cpu")
    seed_init(seed, device, tp_rank)  # megatron's construction draws from it (CUDA: the TP tracker)
    models = [FAMLanguageModel(config, part.layers, part.first, part.last, tp_group=tp_group).to(device)
              for part in parts]
    for model in models:
        init_parameters_(model, args, seed, tp_rank, tp_size, global_name=model.global_name)
    return models


def seed_init(seed: int, device: torch.device, tp_rank: int = 0) -> None:
    """Seed weight initialisation: megatron's per-TP-rank CUDA RNG on GPU, torch's on CPU."""
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    else:
        torch.manual_seed(seed)


__all__ = [
    "FAMConfig",
    "FAMGenerator",
    "FAMLanguageModel",
    "FAMState",
    "Generation",
    "LayerState",
    "ModelArgs",
    "ModelOutput",
    "ModelPart",
    "Sampling",
    "build_model",
    "build_model_parts",
    "generate",
    "load_model_args",
    "micro_chunked_forward_backward",
    "seed_init",
    "to_fam_config",
]
