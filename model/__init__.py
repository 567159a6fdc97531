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

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import torch  # noqa: E402
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
