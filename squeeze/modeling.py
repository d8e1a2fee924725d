"""Build a transformers model skeleton without weights, and fill it from a checkpoint piece by piece.

The skeleton's parameters live on the ``meta`` device (no memory); buffers are real, because
some (rotary ``inv_freq``) are computed at construction and are not stored in checkpoints.
Parameters are then materialised per module from the lazily-read safetensors, so only the
part being worked on occupies memory.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2",
                   "bert")


@contextlib.contextmanager
def params_on_meta():
    """Create modules with parameters on the meta device (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(ckpt: Checkpoint, trust_remote_code: bool = False):
    from transformers import AutoConfig

    model_type = ckpt.config_dict.get("model_type")
    try:
        if getattr(ckpt, "marked", False):  # config.json says "squeeze"; the model's own config is inside
            from squeeze.compat import config_from_dict

            return config_from_dict(ckpt.config_dict, str(ckpt.path))
        return AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise SqueezeError(
            f"unsupported architecture: model_type {model_type!r} is not known to transformers "
            f"({str(e).splitlines()[0][:120]}); squeeze supports {', '.join(SUPPORTED_TYPES)} and others "
            "transformers knows"
        ) from None


def model_class(config, trust_remote_code: bool = False):
    """The transformers class named by ``config.architectures`` (built-in classes only unless
    remote code is trusted), else the causal-LM auto class, else the base auto class."""
    import transformers

    from squeeze.compat import auto_class_for

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    cls = auto_class_for(config)
    if cls is not None:
        return cls
    if trust_remote_code and getattr(config, "auto_map", None):
        return None  # resolved through the auto class with remote code
    raise SqueezeError(
        f"unsupported architecture {getattr(config, 'architectures', None)} (model_type {config.model_type!r}); "
        f"squeeze supports {', '.join(SUPPORTED_TYPES)}"
    )


def build_skeleton(config, trust_remote_code: bool = False, attn_implementation: str = "eager") -> nn.Module:
    """The model with meta parameters and real buffers, in eval mode."""
    from squeeze.compat import instantiate

    cls = model_class(config, trust_remote_code)
    with params_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, trust_remote_code=True,
                                                     attn_implementation=attn_implementation)
        else:
            model = instantiate(cls, config, attn_implementation)
    return model.eval().requires_grad_(False)


def sweep_skeleton(ckpt: Checkpoint, trust_remote_code: bool = False, plain: bool = True):
    """(config, skeleton) for a calibration sweep: :mod:`squeeze.plain_llama` where that computes
    what transformers would (and so transformers is never imported) and ``plain`` allows it, else
    transformers' own classes with SDPA attention."""
    from squeeze.plain_llama import LlamaForCausalLM, plain_config

    config = None if not plain or getattr(ckpt, "marked", False) else plain_config(ckpt.config_dict)
    if config is not None:
        config._name_or_path = str(ckpt.path)
        return config, LlamaForCausalLM.skeleton(config)
    config = load_config(ckpt, trust_remote_code)
    return config, build_skeleton(config, trust_remote_code, attn_implementation="sdpa")


def is_plain(model: nn.Module) -> bool:
    """Whether ``model`` is :mod:`squeeze.plain_llama`'s (a sweep's skeleton, never a loaded model)."""
    return type(model).__module__ == "squeeze.plain_llama"


def as_loaded(model: nn.Module) -> nn.Module:
    """Every loaded model in one state, whichever path built it: trainable float parameters in
    allocator-aligned memory. Neither is cosmetic: torch.matmul picks its GEMM path for a strided 3-D input
    by whether the weight requires grad, and the two paths round differently (MustDrop's CLS query
    and GPT-2's one-token calls differed by 1 ulp)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
        if p.data_ptr() % 64:  # see WeightMap._read: a tensor read in place from a file's offset
            p.data = torch.empty_like(p.data, memory_format=torch.contiguous_format).copy_(p.data)
    return model


class WeightMap:
    """Maps model parameter names to checkpoint keys (handles the base-model prefix and tied
    weights), and moves parameters between the checkpoint and the model."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint):
        self.ckpt = ckpt
        prefix = getattr(model, "base_model_prefix", "") or ""
        keys = set(ckpt.keys())
        self.to_ckpt: dict[str, str] = {}
        self.tied: dict[str, str] = {}
        tied = _tied_pairs(model)
        missing = []
        for name, _ in model.named_parameters(remove_duplicate=False):
            for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
                if cand in keys:
                    self.to_ckpt[name] = cand
                    break
            else:
                if name in tied:
                    self.tied[name] = tied[name]
                else:
                    missing.append(name)
        if missing:  # a legacy layout transformers renames on load (e.g. old LLaVA checkpoints)?
            from squeeze.compat import checkpoint_renamings

            renamed = checkpoint_renamings(model, keys)
            self.to_ckpt.update({n: renamed[n] for n in missing if n in renamed})
            missing = [n for n in missing if n not in renamed]
        if missing:
            raise SqueezeError(
                f"{ckpt.path}: checkpoint does not match its config: {len(missing)} parameters missing "
                f"(e.g. {missing[0]}); is the checkpoint complete?"
            )

    def materialize(self, model: nn.Module, module_name: str, dtype: torch.dtype) -> None:
        """Load every parameter under ``module_name`` ('' for all) from the checkpoint."""
        module = model.get_submodule(module_name) if module_name else model
        prefix = f"{module_name}." if module_name else ""
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            full = prefix + name
            if full in self.tied:
                source = model.get_parameter(self.tied[full])
                if source.device.type == "meta":  # read once, for both: one copy of a tied weight
                    source = nn.Parameter(self._read(self.to_ckpt[self.tied[full]], dtype), requires_grad=False)
                    set_param(model, self.tied[full], source)
                set_param(module, name, source)
                continue
            if p.device.type != "meta":
                continue
            t = self._read(self.to_ckpt[full], dtype)
            if tuple(t.shape) != tuple(p.shape):
                raise SqueezeError(
                    f"{self.ckpt.path}: {self.to_ckpt[full]} has shape {tuple(t.shape)}, config expects {tuple(p.shape)}"
                )
            set_param(module, name, nn.Parameter(t, requires_grad=False))

    def _read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.ckpt.get(key)
        if t.is_floating_point():
            check_finite(t, key, self.ckpt.path)
        else:
            dtype = t.dtype
        # Own, allocator-aligned memory: a tensor read from a file sits at the file's offset, and
        # CPU GEMV kernels round differently at another alignment, so the same weights would give
        # other last bits than the same model loaded from another file. The dtype changes in the
        # same copy: one new tensor, not a converted one and then its aligned copy.
        return torch.empty(t.shape, dtype=dtype).copy_(t)

    def release(self, module: nn.Module) -> None:
        """Drop the parameters of ``module`` back to meta (frees their memory)."""
        for name, p in list(module.named_parameters()):
            set_param(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


# elements per isfinite pass: a bounded temporary (16 MB of bools) however large the tensor (a 70B
# model's embedding holds a billion entries)
FINITE_CHUNK = 1 << 24


def check_finite(t: torch.Tensor, key: str, where) -> None:
    """Refuse a stored tensor with NaN or Inf entries. Each tensor is checked once, as it is read;
    otherwise a corrupt checkpoint shows up blocks later as non-finite activations, or is silently
    exported. A chunk's fp32 sum is non-finite whenever one of its entries is (NaN and Inf
    propagate), and is ~10x cheaper than isfinite().all() (about 0.1 s per 10^8 entries on one
    core: seconds on a 70B model); only a non-finite sum, which a huge finite chunk could also
    give, is looked at entry by entry."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[i:i + FINITE_CHUNK].float()  # fp8 has no kernels of its own; widening is exact
        if bool(torch.isfinite(chunk.sum())) or bool(torch.isfinite(chunk).all()):
            continue
        bad = sum(int((~torch.isfinite(flat[j:j + FINITE_CHUNK].float())).sum())
                  for j in range(0, flat.numel(), FINITE_CHUNK))
        raise SqueezeError(f"{where}: tensor {key} holds non-finite values ({bad} of {flat.numel()} entries are "
                           "NaN or Inf); the checkpoint is corrupt or was saved after training diverged: "
                           "re-download or re-export it")


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """{tied parameter: source parameter} when the config ties them."""
    from squeeze.compat import tied_parameters

    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    text_cfg = get_text() if get_text else cfg
    if not getattr(text_cfg, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False)):
        return {}
    return tied_parameters(model)


def set_param(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    owner, _, leaf = dotted.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = value
