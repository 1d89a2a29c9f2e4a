"""`quantize`, the one verb from a model source to a quantized model: the source loaded (or opened for streaming),
the calibration set resolved, the method's recipe walked in memory (`walk`) or block by block from disk
(`streamed`), the backend set, the result saved where asked."""

from ..calibration import resolve_calibration
from ..errors import InputError
from ..schema import check_options
from .config import FULL_PRECISION, QuantConfig
from .decide import decided_recipe
from .walk import check_backend, check_blocks_for, run_recipe, set_backend


def quantize(model, method: str = "mambaquant", w_bits: int = 8, a_bits: int = 8, calib=None,
             act_granularity: str | None = None, seed: int = 0, calib_samples: int = 32, calib_len: int | None = None,
             progress: bool = False, tokenizer: str | None = None, backend: str = "fake", out=None,
             stream: bool | None = None, overwrite: bool = False, shard_size: int = 2 * 2**30,
             revision: str | None = None, **options):
    """Quantize `model` (a model object, an embedded model name, a directory, a checkpoint or a Hugging Face hub id,
    `org/name` or `org/name@rev`; `revision`, a branch, tag or commit of the hub id) with `method`.

    `calib`: inputs in the model's form (token ids (N, L), images (N, C, H, W), a time series (N, L, C), ...) as a
    tensor, a Dataset or an iterable of inputs or (input, label) pairs, or a .pt / .npz / .safetensors file of
    them; the name of a calibration set (see `mambaquant.calibration.CALIBRATION_SETS`), the path of a training
    text file, or None for the model's default set (embedded models and models whose task is known). The first
    `calib_samples` inputs are used. `tokenizer`: the tokenizer.json for text
    calibration of a BPE-vocabulary model (default: GPT-NeoX's from the data directory). `backend`: "fake" runs the
    quantized linears as a float32 simulation of their integer arithmetic, "int8" with int8 matrix products (see
    `set_backend`: the same numbers, to float32 precision for weight-only models). Bits of 16 quantize nothing
    there: `w_bits=16, a_bits=16` applies the method's transforms alone, which must keep the model's function.
    `options` are `QuantConfig` fields. The returned model carries `quantization_report` (a `QuantReport`).

    With `out` (a directory) the quantized model is written there (atomically; `overwrite` replaces a directory
    mambaquant wrote; Hugging Face shards of at most `shard_size` bytes) and its path is returned. A language model
    checkpoint on disk in safetensors (fp32, fp16 or bf16) is then quantized streamed: read one block at a time and
    written as it goes, so a model larger than memory can be quantized (`methods.streamed`; the same result, bit
    for bit). `stream` True insists on streaming (one line where the source cannot be streamed), False quantizes in
    memory, None (default) streams where the source allows."""
    # not at the top: the loaders import `methods.config`, and so this package, before they are complete
    from ..loaders import load, save, source_at_revision
    from ..loaders.streamed import opened_for_streaming
    from .streamed import quantize_streamed

    if revision is not None:
        model = source_at_revision(model, revision)
    source = model if isinstance(model, str) else type(model).__name__
    config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, act_granularity=act_granularity, seed=seed,
                         **check_options(QuantConfig, options, "quantize"))
    check_backend(backend, config.w_bits != FULL_PRECISION, config.target)  # before any work
    opened = opened_for_streaming(model, strict=bool(stream)) if out is not None and stream is not False else None
    if opened is not None:
        return quantize_streamed(opened, out, config, calib, calib_samples, calib_len, tokenizer, progress, overwrite,
                                 shard_size)
    if stream:
        raise InputError("stream=True needs out: the directory the streamed quantization writes")
    loaded = load(model)
    check_blocks_for(config.method, loaded)
    batches = resolve_calibration(loaded, source, calib, calib_samples, calib_len, seed, tokenizer=tokenizer)
    if config.decide:
        quantized, report = decided_recipe(loaded, config, batches, progress)
    else:  # a model this call loaded is its own: transformed in place, no copy
        quantized, report = run_recipe(loaded, config, batches, progress, copy_model=loaded is model)
    quantized.quantization_report = report
    quantized = set_backend(quantized, backend)
    if out is None:
        return quantized
    return save(quantized, out, overwrite=overwrite, shard_size=shard_size)
