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

import os
import warnings

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
import torch.distributed as dist  # noqa: E402

if not torch.cuda.is_available():  # advice for CUDA streams (slurm/train.sbatch follows it), void on CPU
    warnings.filterwarnings("ignore", message=r"When using async grad allreduce it is recommended to set the "
                            r"environment variable CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning,
                            module=r"megatron\.core\.")

from megatron.core import parallel_state, tensor_parallel  # noqa: E402

from model.cpu_compat import apply_cpu_compat  # noqa: E402
from model.config import FAMConfig, ModelArgs, load_model_args, to_fam_config  # noqa: E402
from model.generation import FAMGenerator, Generation, Sampling, generate  # noqa: E402
from model.init import init_parameters_  # noqa: E402
from model.language_model import FAMLanguageModel, ModelOutput  # noqa: E402
from model.micro_chunks import micro_chunked_forward_backward  # noqa: E402
from model.state import FAMState, LayerState  # noqa: E402


def init_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, backend: str | None = None) -> None:
    """Initialise torch.distributed (env:// under torchrun, else a one-process gloo group) and
    megatron-core's parallel state. gloo on CPU; on GPU NCCL for CUDA tensors and gloo for CPU
    tensors. Idempotent."""
    apply_cpu_compat()
    if not dist.is_initialized():
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        world = dist.get_world_size()
        if world % (tensor_parallel_size * pipeline_parallel_size):
            raise ValueError(
                f"world size {world} is not divisible by tensor_parallel_size={tensor_parallel_size} x "
                f"pipeline_parallel_size={pipeline_parallel_size}"
            )
        parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)


def build_model(
    args: ModelArgs | str,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 1234,
    sequence_parallel: bool = False,
    **overrides,
) -> FAMLanguageModel:
    """This rank's shard of the FAM language model. `args` is ModelArgs or a config name/path.
    Weights are drawn on `device` from `seed` and each parameter's name (model/init.py), so every
    TP size (and pipeline split) starts from the same model."""
    if not isinstance(args, ModelArgs):
        args = load_model_args(args, **overrides)
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        init_parallel()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = to_fam_config(
        args, tensor_parallel_size=tp, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
        cpu_initialization=device.type == "cpu",
    )
    seed_init(seed, device)
    model = FAMLanguageModel(config).to(device)
    init_parameters_(model, args, seed, parallel_state.get_tensor_model_parallel_rank(), tp)
    return model


def seed_init(seed: int, device: torch.device) -> None:
    """Seed weight initialisation: megatron's per-TP-rank CUDA RNG on GPU, torch's on CPU."""
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
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
    "Sampling",
    "build_model",
    "generate",
    "init_parallel",
    "load_model_args",
    "micro_chunked_forward_backward",
    "seed_init",
    "to_fam_config",
]
