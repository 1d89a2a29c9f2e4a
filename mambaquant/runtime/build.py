"""`build(config)`: the model a config describes, with Mamba's random initialisation."""

from ..errors import InputError
from ..schema import check_seed
from .config import BlockConfig, LMConfig, Mamba2LMConfig, ModelConfig, TaggerConfig, VisionConfig
from .hybrid_config import HybridLMConfig
from .init import init_weights
from .lm import MambaLM
from .model import MambaModel, MambaTagger, VisionMamba

INIT_COPIES = 1.5  # the weights, and the largest of initialisation's temporaries
# config class -> model class, most specific first; a config dict names its kind under "architecture"
MODEL_CLASSES = {VisionConfig: VisionMamba, TaggerConfig: MambaTagger, ModelConfig: MambaModel,
                 Mamba2LMConfig: MambaLM, LMConfig: MambaLM, HybridLMConfig: MambaLM}
ARCHITECTURES = {"mamba-model": ModelConfig, "vision-mamba": VisionConfig, "mamba-tagger": TaggerConfig,
                 "mamba-lm": LMConfig, "mamba2-lm": Mamba2LMConfig, "hybrid-lm": HybridLMConfig}


def build(config, seed: int = 0):
    """A model from a config object (`ModelConfig`, `VisionConfig`, `TaggerConfig`, `LMConfig`, `Mamba2LMConfig`)
    or a dict of its fields (with "architecture": one of `ARCHITECTURES`, default "mamba-model"), every field
    checked; initialised as Mamba does (`init_weights`, deterministic for `seed`), in eval mode."""
    if isinstance(config, dict):
        kind = config.get("architecture", "mamba-model")
        if kind not in ARCHITECTURES:
            raise InputError(f"unknown architecture {kind!r}; expected one of {', '.join(ARCHITECTURES)}")
        config = ARCHITECTURES[kind].from_dict({k: v for k, v in config.items() if k != "architecture"},
                                               where=f"{kind} config")
    elif isinstance(config, (BlockConfig, HybridLMConfig)):
        config = type(config).from_dict(config.to_dict(), where=f"{type(config).__name__}")
    else:
        raise InputError(f"expected a model config or a dict of its fields, got a {type(config).__name__}")
    model_class = next((m for c, m in MODEL_CLASSES.items() if type(config) is c), None)
    if model_class is None:
        raise InputError(f"a {type(config).__name__} describes blocks, not a model; expected one of "
                         f"{', '.join(c.__name__ for c in MODEL_CLASSES)}")
    check_seed(seed)
    check_size(model_class, config)
    return init_weights(model_class(config), seed=seed).eval()


def check_size(model_class, config) -> None:
    """Refuse, before anything is allocated, a model whose float32 weights (and initialisation's temporaries) would
    not fit in memory: its parameters counted on the meta device."""
    import torch

    from ..memory import check_allocation

    with torch.device("meta"):
        skeleton = model_class(config)
    parameters = sum(p.numel() for p in skeleton.parameters()) + sum(b.numel() for b in skeleton.buffers())
    check_allocation(parameters * 4 * INIT_COPIES, f"a {model_class.__name__} of {parameters:,} parameters",
                     "; expected a smaller config")
