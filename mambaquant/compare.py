"""`compare`: every method x bit width x activation granularity against full precision, with one calibration set
and one evaluation for all, as rows of a table."""

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import InputError
from .methods import FULL_PRECISION, GRANULARITIES, METHODS, PRESETS, QuantConfig, methods_for, run_recipe
from .methods.config import AUTO_METHODS, ENGINE_GRANULARITY, KV_METHODS, SCOPES
from .runtime import HybridLMConfig
from .outputs import write_atomic
from .schema import display
from .progress import progress as progress_of

DEFAULT_BITS = ("w8a8", "w4a8", "w4a16")
SCOPE_NOTE = ("Scope all: every activation the method quantizes (the linear layers' inputs, and in the Mamba layers "
              "the conv1d input, the scan's operands and the state) at the activation bits; scope linear: the linear "
              "layers' inputs only, the conv, the scan and its state in float32, as the other tools do.")
USER_TASK = "user-data"  # the rows of the user's own labelled set (`eval_data`)


@dataclass
class Row:
    model: str
    method: str
    bits: str
    granularity: str  # "tensor" (static), "token" (dynamic), "auto" (per site), "none" (activations not quantized)
    task: str
    metric: str
    value: float
    fp_value: float
    higher_is_better: bool
    protocol: str
    samples: int
    quantize_seconds: float
    agreement: float | None = None
    extra: dict | None = None
    scope: str = "all"  # which activations were quantized (QuantConfig.scope)

    @property
    def change(self) -> float:
        return self.value - self.fp_value

    @property
    def relative_change(self) -> float:
        """Relative change in %, signed so that negative is worse."""
        sign = 1.0 if self.higher_is_better else -1.0
        return sign * 100.0 * self.change / abs(self.fp_value) + 0.0 if self.fp_value else 0.0  # + 0.0: no "-0.00"

    def to_dict(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if v is not None}
        return {**row, "change": self.change, "relative_change_percent": self.relative_change}


def default_methods(kv_bits: int = FULL_PRECISION) -> tuple[str, ...]:
    """Every method, or with a quantized KV cache those that quantize one (beside fp, the reference)."""
    return METHODS if kv_bits == FULL_PRECISION else ("fp",) + KV_METHODS


def plan(methods, bits, granularities, target: str = "runtime", scopes=("all",),
         kv_bits: int = FULL_PRECISION) -> list[tuple[str, str, str, str]]:
    """(method, bits, granularity, scope) runs: FP once; weight-only bit widths once per method; otherwise every
    granularity and scope asked for, "auto" only for the methods whose recipe has it. For an engine `target` one
    run per method and bit width, with the engine's own activation quantization. Each of methods, bits,
    granularities and scopes is a list of names or one comma-separated string. `kv_bits` (the KV cache's, every
    run the same) is checked against each method and scope."""
    methods, bits, granularities, scopes = (
        names_of(value, what) for value, what in
        ((methods, "methods"), (bits, "bits"), (granularities, "granularities"), (scopes, "scopes")))
    for scope in scopes:
        if scope not in SCOPES:
            raise InputError(f"unknown scope {scope!r}; expected some of {', '.join(SCOPES)}")
    for method in methods:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; expected some of {', '.join(METHODS)}")
    for preset in bits:
        if preset.lower() not in PRESETS:
            raise InputError(f"unknown bit widths {preset!r}; expected some of {', '.join(PRESETS)}")
    if kv_bits != FULL_PRECISION:
        for method, scope in ((m, scope) for m in methods if m != "fp" for scope in scopes):
            QuantConfig(method=method, kv_bits=kv_bits, scope=scope, target=target)
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise InputError(f"unknown granularity {granularity!r}; expected some of {', '.join(GRANULARITIES)}")
    runs = [("fp", "fp32", "none", "all")] if "fp" in methods else []
    if target == "vllm":  # the inputs of the linears vLLM quantizes: static per tensor or dynamic per token
        for preset in (b.lower() for b in bits):
            w_bits, a_bits = PRESETS[preset]
            QuantConfig(method="rtn", w_bits=w_bits, a_bits=a_bits, target=target)
            for method in (m for m in methods if m != "fp"):
                if a_bits == FULL_PRECISION:
                    runs.append((method, preset, "none", "linear"))
                else:
                    runs += [(method, preset, g, "linear") for g in granularities if g in ("tensor", "token")]
        return runs
    if target != "runtime":
        for preset in (b.lower() for b in bits):
            QuantConfig(method="rtn", w_bits=PRESETS[preset][0], a_bits=PRESETS[preset][1], target=target)
        return runs + [(m, b.lower(), ENGINE_GRANULARITY, "all") for b in bits for m in methods if m != "fp"]
    for preset in (b.lower() for b in bits):
        for method in (m for m in methods if m != "fp"):
            if PRESETS[preset][1] == FULL_PRECISION:
                runs.append((method, preset, "none", "all"))
                continue
            runs += [(method, preset, g, scope) for scope in scopes for g in granularities
                     if g != "auto" or method in AUTO_METHODS]
    if not runs:
        raise InputError("nothing to compare: no method and bit width selected")
    return runs


def run_label(run: tuple[str, str, str, str]) -> str:
    method, preset, granularity, scope = run
    return f"{method} {preset} {granularity}" + (" linear only" if scope == "linear" else "")


def names_of(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise InputError(f"{what} must be a list of names or a comma-separated string, got {display(repr(value))}")
    return list(value)


class Memo(nn.Module):
    """The full-precision reference, run once per distinct input: every compared run asks it for the same
    predictions (agreement), so they are computed once, not once per run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.outputs = model, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, tuple(x.shape), hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest())
        if key not in self.outputs:
            self.outputs[key] = self.model(x)
        return self.outputs[key]


def compare(source, methods=None, bits=DEFAULT_BITS, granularities=GRANULARITIES, tasks=None,
            eval_samples: int | None = None, calib=None, calib_samples: int = 32, calib_len: int | None = None,
            seed: int = 0, data: dict | None = None, tokenizer: str | None = None, progress: bool = False,
            on_row=None, lm_eval=None, eval_data=None, target: str = "runtime", scopes=None,
            kv_bits: int = FULL_PRECISION) -> list[Row]:
    """Quantize `source` (an embedded model name, a directory or a model object) with every planned run and
    evaluate each against the full-precision model on `tasks` (default: every protocol that applies, or none
    when `lm_eval` is given). `methods`: None for every method that applies to the model's block kind (Quamba2
    only to Mamba-2). `data` maps a task to its data file (GPT-NeoX LM tasks); `lm_eval` (an LMEvalConfig) adds
    lm-evaluation-harness tasks and their mean; `eval_data` (the user's own labelled set, see `evaluate`) adds its
    top-1 as task "user-data" (and, as `lm_eval`, no built-in task by default); `on_row` is called with each row as
    it is done. Calibration never takes `eval_data`: it is `calib`, or the model's default training set. `target`
    "llama.cpp" restricts every run to what llama.cpp executes, and simulates it (`QuantConfig.target`). `scopes`:
    which activations each run quantizes (`QuantConfig.scope`); None: "all", and for a hybrid also "linear" (the
    other tools' choice: the linear layers' inputs only). `kv_bits`: every run's KV cache at these bits (its rows'
    bits say so, e.g. w8a8kv4); then `methods` None means those that quantize a KV cache, and scope is "all"."""
    from .calibration import resolve_calibration
    from .evaluation import evaluate
    from .loaders import load
    from .tasks import tasks_for
    from .zoo import embedded_name

    name = (embedded_name(source) or source) if isinstance(source, str) else type(source).__name__
    if methods is not None:
        methods = names_of(methods, "methods")
    elif kv_bits != FULL_PRECISION:
        methods = default_methods(kv_bits)
    if scopes is None and kv_bits != FULL_PRECISION:
        scopes = ("all",)  # the KV cache is quantized with every activation, not with the linear inputs alone
    plan(methods or METHODS, bits, granularities, target, scopes or SCOPES, kv_bits)  # bad options fail early
    if lm_eval is not None:
        from .evaluation.local_tasks import load_tasks

        # so do unknown tasks, unreachable task data and more few-shot examples than a task has
        load_tasks(lm_eval.tasks, lm_eval.data, lm_eval.include, lm_eval.num_fewshot, lm_eval.trust_code)
    if eval_data is not None:
        from .evaluation.user_data import user_data

        eval_data = user_data(eval_data, eval_samples, "eval_data")  # read once, and a bad file fails here
    model = load(source).eval()
    if scopes is None:
        scopes = SCOPES if isinstance(getattr(model, "config", None), HybridLMConfig) else ("all",)
    runs = plan(methods_for(model, methods), bits, granularities, target, scopes, kv_bits)
    tasks = list(tasks or ([] if lm_eval is not None or eval_data is not None else tasks_for(model, name)))
    data = data or {}
    batches = resolve_calibration(model, name, calib, calib_samples, calib_len, seed, tokenizer=tokenizer)

    def measure(m: nn.Module, ref: nn.Module | None) -> dict:
        results = {task: evaluate(m, name, eval_samples, reference=ref, task=task, data=data.get(task),
                                  tokenizer=tokenizer) for task in tasks}
        if eval_data is not None:
            results[USER_TASK] = evaluate(m, name, eval_samples, reference=ref, eval_data=eval_data)
        return results

    reference = measure(model, None)
    if lm_eval is not None:
        reference.update(lm_eval_rows(model, name, lm_eval, tokenizer))
    memo = Memo(model)
    rows = []
    for method, preset, granularity, scope in progress_of(runs, name, "run", progress, label=run_label):
        started = time.perf_counter()
        if method == "fp":
            quantized = model
        else:
            w_bits, a_bits = PRESETS[preset]
            config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, seed=seed, target=target, scope=scope,
                                 act_granularity=None if granularity in ("none", ENGINE_GRANULARITY) else granularity,
                                 kv_bits=kv_bits)
            quantized, _ = run_recipe(model, config, batches)
        seconds = time.perf_counter() - started
        results = measure(quantized, None if method == "fp" else memo)
        if lm_eval is not None:
            results.update(reference if method == "fp" else lm_eval_rows(quantized, name, lm_eval, tokenizer))
        for task, result in results.items():
            label = preset if method == "fp" or kv_bits == FULL_PRECISION else f"{preset}kv{kv_bits}"
            row = Row(name, method, label, granularity, task, result.metric, result.value, reference[task].value,
                      result.higher_is_better, result.protocol, result.samples, round(seconds, 2), result.agreement,
                      result.extra, scope)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def lm_eval_rows(model: nn.Module, name: str, config, tokenizer: str | None) -> dict:
    from .evaluation import lm_eval

    return dict(lm_eval(model, config, name, tokenizer))


def format_table(rows: list[Row]) -> str:
    """A plain-text table, one block per model and task, with its protocol above it."""
    lines = []
    for key in dict.fromkeys((row.model, row.task) for row in rows):
        block = [row for row in rows if (row.model, row.task) == key]
        first = block[0]
        scoped = any(row.scope != "all" for row in block)
        lines += ["", f"{first.model}: {first.metric} ({'higher' if first.higher_is_better else 'lower'} is better)",
                  f"  protocol: {first.protocol}; {first.samples} samples"] + ([f"  {SCOPE_NOTE}"] if scoped else []) + \
            [f"  {'method':12s} {'bits':8s} {'granularity':12s} " + (f"{'scope':7s} " if scoped else "") +
             f"{'value':>10s} {'change':>9s} {'relative':>9s} {'agreement':>9s} {'quant s':>8s}"]
        for row in block:
            agreement = f"{row.agreement:8.2f}%" if row.agreement is not None else f"{'-':>9s}"
            lines.append(f"  {row.method:12s} {row.bits:8s} {row.granularity:12s} " +
                         (f"{row.scope:7s} " if scoped else "") + f"{row.value:10.4f} "
                         f"{row.change:+9.4f} {row.relative_change:+8.2f}% {agreement} {row.quantize_seconds:8.1f}")
    return "\n".join(lines[1:])


def to_markdown(rows: list[Row], command: str | None = None) -> str:
    lines = []
    for key in dict.fromkeys((row.model, row.task) for row in rows):
        block = [row for row in rows if (row.model, row.task) == key]
        first = block[0]
        scoped = any(row.scope != "all" for row in block)
        lines += [f"### {first.model}: {first.metric}", "",
                  f"Protocol: {first.protocol}; {first.samples} samples. "
                  f"{'Higher' if first.higher_is_better else 'Lower'} is better; relative change signed so that "
                  "negative is worse." + (f" {SCOPE_NOTE}" if scoped else ""), "",
                  "| method | bits | granularity | " + ("scope | " if scoped else "") +
                  "value | change | relative | agreement | quantize s |",
                  "|---|---|---|" + ("---|" if scoped else "") + "---:|---:|---:|---:|---:|"]
        for row in block:
            agreement = f"{row.agreement:.2f} %" if row.agreement is not None else "-"
            lines.append(f"| {row.method} | {row.bits} | {row.granularity} | " + (f"{row.scope} | " if scoped else "")
                         + f"{row.value:.4f} | {row.change:+.4f} | {row.relative_change:+.2f} % | {agreement} | "
                         f"{row.quantize_seconds:.1f} |")
        lines.append("")
    if command:
        lines.append(f"Command: `{command}`")
    return "\n".join(lines) + "\n"


def write_json(path, rows: list[Row]) -> None:
    write_atomic(path, json.dumps([row.to_dict() for row in rows], indent=1) + "\n")
