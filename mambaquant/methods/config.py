"""What a quantization run is asked for (`QuantConfig`) and what it did (`QuantReport`), with the names of the
methods, bit-width presets and granularities. Imports neither the loaders nor the walk: the quantized-checkpoint
loader validates against these."""

from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from ..errors import InputError
from ..schema import check_seed
from ..quant.quantizer import QuantSpec
from ..runtime.sites import TABLES

METHODS = ("fp", "rtn", "smoothquant", "quarot", "gptq", "quamba", "quamba2", "mambaquant", "mambaquant+")
GRANULARITIES = ("tensor", "token", "auto")
MAMBA2_ONLY_METHODS = ("quamba2",)  # its groups are Mamba-2's heads and B/C groups
PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4), "w4a16": (4, 16)}
FULL_PRECISION = 16  # bits meaning "quantize nothing here"
# QuaRot's paper rounds its rotated weights with GPTQ, and so do we for MambaQuant: at W4 it is worth ~0.6 % bits per
# byte on mamba-shakespeare over round-to-nearest (RTN is still one option away: weight_rounding="rtn")
WEIGHT_ROUNDING = {"gptq": "gptq", "quarot": "gptq", "quamba2": "gptq", "mambaquant": "gptq", "mambaquant+": "gptq"}
# MambaQuant's recipe as the paper gives it is "mambaquant"; "mambaquant+" is that recipe with what goes beyond it,
# each kept because it helped on training data (docs/methods.md): clipping searched per weight channel and per
# activation site (`clip_search`), and mixed precision by site at 4-bit activations (SSM_SITE_BITS)
AUTO_METHODS = ("mambaquant", "mambaquant+")  # their granularity is "auto" by default: the per-site choice
# mambaquant+'s mixed precision where a_bits is 4 or less: the activations that no linear layer reads (the conv1d
# input, the scan's operands, the state h) at this many bits; every linear layer's input at a_bits
SSM_SITE_BITS = 8
CALIB_DTYPES = ("float32", "bfloat16")  # blocks always compute in float32
CLUSTER_DEFAULTS = {"head_clusters": 4, "channel_clusters": 4}  # Quamba2's, for its mamba2-130m and 2.7b
# Where the quantized model will run: our runtime (every site, every transform), or an engine, whose execution the
# recipe is restricted to and simulated exactly (exporters/llama_cpp.py: llama.cpp's Q8_0 / Q4_0 weights, its own
# int8 quantization of each linear's input per 32 values, no online transform; exporters/vllm.py: vLLM's int8 / int4
# weights, int8 inputs static per tensor or dynamic per token at the linears it quantizes, online input transforms at
# out_proj / down_proj only)
TARGETS = ("runtime", "llama.cpp", "vllm")
VLLM_GRANULARITIES = ("tensor", "token")  # vLLM's int8 inputs: static per tensor, dynamic per token
ENGINE_GRANULARITY = "block"  # the act_granularity of an engine target: the engine's own dynamic blocks
# Which activations a run quantizes: every site the method's recipe quantizes ("all": the linears' inputs and the
# SSM's other products' operands: the conv input, the scan's inputs, C and the state), or the linears' inputs only
# ("linear"), as llm-compressor, GPTQModel, ModelOpt and llama.cpp do, keeping the conv, the scan and the state in float
SCOPES = ("all", "linear")
# The KV cache: the attention's k and v sites as the cache holds them, quantized at `kv_bits` whatever a_bits and
# site_bits say (16: kept in float, as are the attention's two products), dynamic, asymmetric, one range per position
# and key/value head (QuaRot's choice). The methods that take it act on every layer kind: Quamba and Quamba2 are
# written for Mamba layers alone, and fp quantizes nothing
KV_CACHE_SITES = ("k", "v")
KV_METHODS = tuple(m for m in METHODS if m not in ("fp", "quamba", "quamba2"))
SITE_KINDS = sorted({kind for table in TABLES.values() for kind in table})


@dataclass
class QuantConfig:
    method: str = "mambaquant"
    w_bits: int = 8
    a_bits: int = 8  # 16: weights only
    act_granularity: str | None = None  # None: "auto" for mambaquant, "tensor" for the baselines
    observer: str = "minmax"  # static ranges: "minmax" or "percentile"
    percentile: float = 99.99
    weight_group_size: int = 0  # 0: per output channel
    weight_rounding: str | None = None  # "rtn" or "gptq"; None: the method's own (WEIGHT_ROUNDING)
    alpha: float = 0.5  # smoothing strength
    token_outlier_ratio: float = 10.0  # auto: tokens whose |x| max exceeds this many times the median token's ...
    token_outlier_share: float = 0.01  # ... in more than this share of tokens: token-wise outliers
    seed: int = 0
    head_clusters: int | None = None  # quamba2 (None: 4): scan-input clusters of heads per B/C group ...
    channel_clusters: int | None = None  # ... and of channels per head cluster
    calib_dtype: str = "float32"  # how calibration activations are held between blocks ("bfloat16": half the memory)
    clip_search: bool | None = None  # clipping searched per weight channel and activation site; None: the method's
    act_order: bool = False  # GPTQ's columns by decreasing input energy (measured, not kept: docs/methods.md)
    site_bits: dict | None = None  # activation bits by site kind ({"h": 8}) over a_bits; None: the method's
    target: str = "runtime"  # TARGETS
    scope: str = "all"  # SCOPES
    decide: bool = False  # the recipe's optional parts kept only where they help on held-back calibration data
    kv_bits: int = FULL_PRECISION  # the KV cache's bits (KV_CACHE_SITES); 16: in float
    # where one static range cannot hold a site's calibration tokens, fall back to what does (granularity.StaticCheck:
    # per position, 8 bits, per token); None: on for mambaquant+ in our runtime, off for the published recipes
    # (mambaquant is the paper's) and engine targets. Either way the report names the sites.
    static_fallback: bool | None = None
    smooth: bool = True  # mambaquant / mambaquant+: their smoothing (False: their rotations alone)

    def __post_init__(self):
        if self.calib_dtype not in CALIB_DTYPES:
            raise InputError(f"unknown calibration dtype {self.calib_dtype!r}; expected one of "
                             f"{', '.join(CALIB_DTYPES)}")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.weight_rounding is None:
            self.weight_rounding = WEIGHT_ROUNDING.get(self.method, "rtn")
        if self.weight_rounding not in ("rtn", "gptq"):
            raise InputError(f"unknown weight rounding {self.weight_rounding!r}; expected rtn or gptq")
        if self.scope not in SCOPES:
            raise InputError(f"unknown scope {self.scope!r}; expected one of {', '.join(SCOPES)} (every site the "
                             "method quantizes, or the linear layers' inputs only)")
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        self.check_kv_bits()
        if self.target == "vllm":
            self.check_vllm_target()
        elif self.target != "runtime":
            self.check_engine_target()
        if self.act_granularity is None:
            self.act_granularity = "auto" if self.method in AUTO_METHODS else "tensor"
        if self.act_granularity not in GRANULARITIES + (ENGINE_GRANULARITY,) or \
                (self.act_granularity == ENGINE_GRANULARITY) != (self.target == "llama.cpp"):
            raise InputError(f"unknown activation granularity {self.act_granularity!r}; "
                             f"expected one of {', '.join(GRANULARITIES)}")
        for bits in (self.w_bits, self.a_bits):
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise InputError(f"bit widths must be integers from 2 to 8, or 16 for none; got {bits!r}")
            if bits != FULL_PRECISION:
                QuantSpec(bits)  # raises for anything outside 2..8
        for name, default in CLUSTER_DEFAULTS.items():
            value = getattr(self, name)
            if value is not None and self.method != "quamba2":
                raise InputError(f"{name} is an option of method quamba2 (its scan-input clusters), not of "
                                 f"{self.method}")
            if value is None and self.method == "quamba2":
                setattr(self, name, value := default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024):
                raise InputError(f"{name} must be an integer from 1 to 1024, got {value!r}")
        plus = self.method == "mambaquant+"
        if self.clip_search is None:
            self.clip_search = plus
        if self.static_fallback is None:
            self.static_fallback = self.method == "mambaquant+" and self.target == "runtime"
        for name in ("clip_search", "act_order", "decide", "static_fallback", "smooth"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.smooth and self.method not in AUTO_METHODS:
            raise InputError(f"smooth false turns off the smoothing of mambaquant and mambaquant+ (their rotations "
                             f"stay); method {self.method} has no such switch (smoothquant without smoothing is rtn)")
        if self.static_fallback and self.target != "runtime":
            raise InputError(f"static_fallback puts per-position, 8-bit or per-token ranges where a static one does not "
                             f"hold; target {self.target} takes only its own activation scheme: expected "
                             "static_fallback false")
        if self.act_order and (self.weight_rounding != "gptq" or self.weight_group_size):
            raise InputError("act_order orders GPTQ's columns: it needs weight_rounding gptq and per-channel weight "
                             "scales (weight_group_size 0)")
        if self.site_bits is None and not (plus and self.a_bits <= 4):
            self.site_bits = {}  # (mambaquant+'s own is chosen from the model's sites in the walk)
        if self.site_bits is not None:
            self.check_site_bits()
        check_seed(self.seed)

    @property
    def online_transforms(self) -> bool:
        """Whether the model may hold transforms applied at run time (online rotations, S-SiLU, scales at a site):
        our runtime runs them, an engine does not."""
        return self.target == "runtime"

    @property
    def online_input_hadamards(self) -> bool:
        """Whether the online Hadamards at a Mamba-2 out_proj's input and an MLP's down_proj input may stay: our
        runtime runs them, and vLLM as compressed-tensors input transforms; llama.cpp runs none."""
        return self.target in ("runtime", "vllm")

    def check_vllm_target(self) -> None:
        """What vLLM holds (exporters/vllm.py): int8 weights per channel with int8 inputs static per tensor or
        dynamic per token (W8A8), or int8 / int4 weights with float inputs (W8A16, W4A16); only the linears' inputs
        quantized (scope linear)."""
        where = "target vllm"
        if self.w_bits not in (4, 8):
            raise InputError(f"{where} holds int8 or int4 weights: expected w_bits 8 or 4, got {self.w_bits}")
        if self.a_bits not in (8, FULL_PRECISION):
            raise InputError(f"{where} quantizes a linear's input to int8 or not at all: expected a_bits 8 or 16, got "
                             f"{self.a_bits}" + (" (W4A4 has no vLLM kernel on these layers)" if self.a_bits == 4 else ""))
        if self.a_bits == 8 and self.w_bits != 8:
            raise InputError(f"{where} runs int8 inputs with int8 weights only (W8A8): expected w_bits 8 with a_bits 8, "
                             f"or a_bits 16 (W{self.w_bits}A16)")
        if self.act_granularity is None:
            self.act_granularity = "tensor"
        if self.act_granularity not in VLLM_GRANULARITIES:
            raise InputError(f"{where} quantizes a linear's input statically per tensor or dynamically per token: "
                             f"expected act_granularity tensor or token, got {self.act_granularity!r}")
        if self.a_bits == 8 and self.weight_group_size:
            raise InputError(f"{where}'s W8A8 holds weights per output channel: expected weight_group_size 0, got "
                             f"{self.weight_group_size}")
        if self.site_bits:
            raise InputError(f"{where} quantizes only the linear layers' inputs, at 8 bits: site_bits do not apply")
        if self.act_granularity == "token" and self.a_bits == 8 and (self.clip_search or (
                self.clip_search is None and self.method == "mambaquant+")):
            raise InputError(f"{where}: clip_search clips activation ranges, which vLLM's dynamic per-token scales do "
                             "not: expected act_granularity tensor with it, or clip_search false")
        self.scope = "linear"  # vLLM quantizes nothing but the linears' inputs

    def check_engine_target(self) -> None:
        """What llama.cpp holds: Q8_0 / Q4_0 weights (blocks of 32 with a float16 scale; our per-channel scales or
        groups of a multiple of 32 fit them exactly), and its own int8 quantization of each linear's input."""
        where = f"target {self.target}"
        if self.w_bits not in (4, 8):
            raise InputError(f"{where} holds weights as Q8_0 or Q4_0: expected w_bits 8 or 4, got {self.w_bits}")
        if self.a_bits != 8:
            raise InputError(f"{where} quantizes each linear's input itself, to int8 per 32 values: expected a_bits 8 "
                             f"(the default), got {self.a_bits}")
        if self.act_granularity not in (None, ENGINE_GRANULARITY):
            raise InputError(f"{where} quantizes each linear's input itself (dynamic, per 32 values): expected no "
                             f"act_granularity, got {self.act_granularity!r}")
        self.act_granularity = ENGINE_GRANULARITY
        if isinstance(self.weight_group_size, int) and self.weight_group_size % 32:
            raise InputError(f"{where} stores weights in blocks of 32: expected a weight_group_size that is a multiple "
                             f"of 32 (or 0, per output channel), got {self.weight_group_size}")
        if self.site_bits:
            raise InputError(f"{where} quantizes only the linear layers' inputs, at 8 bits: site_bits do not apply")

    def check_kv_bits(self) -> None:
        bits = self.kv_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == FULL_PRECISION):
            raise InputError(f"kv_bits must be an integer from 2 to 8, or 16 for a KV cache in float; got {bits!r}")
        if bits == FULL_PRECISION:
            return
        if self.method not in KV_METHODS:
            does = "quantizes nothing" if self.method == "fp" else "acts on the Mamba layers only"
            raise InputError(f"kv_bits: method {self.method} {does}; the KV cache is quantized by "
                             f"{', '.join(KV_METHODS)}")
        if self.scope != "all":
            raise InputError(f"kv_bits quantizes the KV cache, which scope {self.scope} keeps in float (the linear "
                             "layers' inputs only): expected scope all")
        if self.target != "runtime":
            raise InputError(f"target {self.target} holds its own KV cache (the engine's KV cache type, e.g. "
                             "llama.cpp's --cache-type-k / --cache-type-v): kv_bits does not apply")

    def check_site_bits(self) -> None:
        if not isinstance(self.site_bits, dict):
            raise InputError(f"site_bits maps site kinds to activation bits, e.g. {{\"h\": 8}}; got {self.site_bits!r}")
        for kind, bits in self.site_bits.items():
            if kind not in SITE_KINDS:
                raise InputError(f"site_bits: unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS)}")
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise InputError(f"site_bits[{kind!r}] must be an integer from 2 to 8, got {bits!r}")
        if self.site_bits and self.a_bits == FULL_PRECISION:
            raise InputError("site_bits sets activation bits by site, but a_bits is 16 (activations not quantized)")

    def activation_bits(self, kind: str) -> int:
        return self.site_bits.get(kind, self.a_bits)

    def kv_cache_spec(self, head_dim: int) -> QuantSpec:
        """The KV cache's quantizer (its bits whatever a_bits and site_bits say): dynamic, one range per position and
        key/value head; asymmetric, as QuaRot quantizes its cache: a head's values at one position need not be
        centred on zero, and a zero point spreads all 2^b levels over their range where symmetric codes may spend
        up to half of them on a side the values do not reach."""
        return QuantSpec(self.kv_bits, symmetric=False, granularity="group", group_size=head_dim, dynamic=True)

    def resolve_site_bits(self, ssm_kinds) -> "QuantConfig":
        """This config with mambaquant+'s own site bits where they were left to it: `SSM_SITE_BITS` at the site
        kinds `ssm_kinds` (the activation sites no linear layer reads)."""
        if self.site_bits is not None:
            return self
        return replace(self, site_bits={kind: SSM_SITE_BITS for kind in sorted(ssm_kinds)})

    @classmethod
    def preset(cls, bits: str, **kwargs) -> "QuantConfig":
        if bits.lower() not in PRESETS:
            raise InputError(f"unknown bit widths {bits!r}; expected one of {', '.join(PRESETS)}")
        w_bits, a_bits = PRESETS[bits.lower()]
        return cls(w_bits=w_bits, a_bits=a_bits, **kwargs)

    def weight_spec(self, in_features: int | None = None) -> QuantSpec:
        """The weights' quantizer (of a linear with `in_features` inputs: per output channel where the group size
        does not divide them); scales in float16 for llama.cpp."""
        group = self.weight_group_size
        if group and in_features is not None and in_features % group:
            group = 0
        return QuantSpec(self.w_bits, granularity="group" if group else "channel", group_size=group or 128,
                         half_scales=self.target == "llama.cpp")

    def linear_weight_spec(self, linear) -> QuantSpec:
        """`weight_spec` for one linear layer; for vLLM int8 per channel where its 4-bit kernels cannot hold the
        layer's output width (exporters/vllm.py)."""
        spec = self.weight_spec(linear.in_features)
        if self.target == "vllm" and self.w_bits == 4 and linear.out_features % 64:
            return replace(spec, bits=8, granularity="channel")
        return spec


@dataclass
class QuantReport:
    config: dict
    transforms: list[str] = field(default_factory=list)
    activation_sites: dict[str, str] = field(default_factory=dict)  # site -> its quantizer
    granularity_reasons: dict[str, str] = field(default_factory=dict)
    clipping: dict[str, str] = field(default_factory=dict)  # site -> its searched clipping ratio and why
    weights: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # what `decide` kept and dropped, and by how much
    static_ranges: list[str] = field(default_factory=list)  # the sites whose static range does not hold, and what then

    def to_dict(self) -> dict:
        return asdict(self)

    def site_lines(self) -> list[str]:
        """One line per quantized activation site: its quantizer, and why it has that granularity, range and
        bits (what `auto` and mambaquant+'s searches chose)."""
        lines = []
        for name, description in self.activation_sites.items():
            why = [text for text in (self.granularity_reasons.get(name), self.clipping.get(name)) if text]
            lines.append(f"{name}: {description}" + (f" ({'; '.join(why)})" if why else ""))
        return lines

    def summary(self) -> str:
        """What was quantized where, grouped by site kind over the layers."""
        c = self.config
        lines = [f"method {c['method']}, weights int{c['w_bits']}, activations "
                 f"{'full precision' if c['a_bits'] == FULL_PRECISION else 'int' + str(c['a_bits'])}, "
                 f"granularity {c['act_granularity']}"
                 + (f", KV cache int{c['kv_bits']} per position and head" if c.get("kv_bits", FULL_PRECISION) !=
                    FULL_PRECISION else "")]
        lines += [f"  transforms: {t}" for t in self.transforms]
        lines += [f"  weights: {w}" for w in self.weights]
        lines += [f"  decided: {d}" for d in self.decisions]
        lines += [f"  static ranges: {line}" for line in self.static_ranges]
        by_kind: dict[str, Counter] = {}
        for name, description in self.activation_sites.items():
            kind = ".".join(part for part in name.split(".") if not part.isdigit() and part != "layers")
            by_kind.setdefault(kind, Counter())[description] += 1
        for kind, counts in by_kind.items():
            lines.append(f"  {kind}: " + "; ".join(f"{d} x{n}" for d, n in counts.items()))
        return "\n".join(lines)
