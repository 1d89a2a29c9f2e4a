"""lm-evaluation-harness adapter: any language model of our runtime (full precision or quantized, either backend)
as an lm-eval `LM` registered as "mambaquant", and the tasks' results as our `Result`s.

`python -m mambaquant.harness ARGS` is lm-eval's own command line with this model registered (lm-eval 0.4
discovers no model plugins), e.g. `--model mambaquant --model_args pretrained=DIR,backend=int8 --tasks ...`.

Batches are right-padded: a causal model's output at a position never sees later positions, so padding after a
sequence changes nothing before it, and no padding token enters the scan ahead of a real one."""

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from ..errors import InputError
from ..runtime import MambaLM, MambaTagger, VisionMamba
from ..runtime.attention import KVCache
from ..runtime.conv import SSMState
from ..runtime.parallel import ParallelState
from ..runtime.zamba import ZambaState
from ..runtime.lm import sample
from .local_tasks import LM_EVAL_VERSION, PAPER_TASKS, LMEvalConfig, load_tasks, quiet
from .result import Result
from .text import check_logits

NEWLINE = 10  # what a byte-level model's documents start after: byte models have no end-of-text token
DEFAULT_MAX_GEN_TOKENS = 256


@register_model("mambaquant")
class MambaQuantLM(LM):
    """`pretrained`: an embedded model name, a directory or checkpoint (quantized ones included), or a model
    object; `backend` "fake" or "int8" for a quantized model (None: as it is). `max_length` bounds the context as
    lm-eval's HF models do (2048, the papers' setting); a recurrent model has no limit of its own. `device` and
    `max_batch_size`, which lm-eval's command line passes to every model, are ignored: the runtime runs on the
    CPU, in batches of `batch_size`."""

    def __init__(self, pretrained, backend: str | None = None, tokenizer: str | None = None, batch_size=8,
                 max_length: int = 2048, prefix_token_id: int | None = None, seed: int = 1234, progress: bool = True,
                 device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        from ..loaders import load
        from ..methods import set_backend
        from ..tokenizer import own_tokenizer, tokenizer_for

        model = load(pretrained) if isinstance(pretrained, str) else pretrained
        language_model = isinstance(model, MambaLM) or (  # or a stand-in with its interface, as the tests use
            isinstance(model, nn.Module) and not isinstance(model, (VisionMamba, MambaTagger))
            and hasattr(getattr(model, "config", None), "vocab_size"))
        if not language_model:
            name = pretrained if isinstance(pretrained, str) else "the model"
            raise InputError(f"{name}: lm-eval tasks need a language model, got a {type(model).__name__}")
        self.model = model.eval() if backend is None else set_backend(model.eval(), backend)
        self.vocab_size = model.config.vocab_size
        self.tokenizer = tokenizer_for(self.vocab_size, tokenizer or own_tokenizer(pretrained))
        if getattr(self.tokenizer, "vocab_size", 0) > self.vocab_size:
            raise InputError(f"the tokenizer has {self.tokenizer.vocab_size:,} tokens, more than the model's "
                             f"vocabulary of {self.vocab_size:,}; expected the model's own tokenizer (--tokenizer)")
        eot = getattr(self.tokenizer, "eot_id", None)
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else NEWLINE if eot is None else eot
        self.eot_id = eot
        self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
        self.max_length = int(max_length)
        if self.batch_size < 1 or self.max_length < 2:
            raise InputError(f"batch_size {batch_size} and max_length {max_length}: expected >= 1 and >= 2")
        self.generator = torch.Generator().manual_seed(int(seed))
        self.progress = progress

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as lm-eval's HF models cut them: the context's trailing spaces
        go to the continuation, and the continuation is what encoding both adds to encoding the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, self.tokenizer.encode(context + continuation)[len(context_ids) :]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable: bool = False):
        """(log-probability, greedy) of each continuation after its context, the input cut to its last
        max_length tokens. Continuations that share a context (the choices of a multiple-choice document) run
        from one prefill of it, the recurrent state copied to each; the others in right-padded batches, longest
        first."""
        inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in pairs]
        for (_, continuation), ids in zip(pairs, inputs):
            if len(continuation) > len(ids):
                raise InputError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                 f"{self.max_length}; expected a larger max_length")
        groups = {}
        for i, (context, continuation) in enumerate(pairs):
            if isinstance(self.model, MambaLM) and continuation and len(context + continuation) <= self.max_length + 1:
                groups.setdefault(tuple(context), []).append(i)  # not cut by max_length: the context is shared
        shared = [members for members in groups.values() if len(members) > 1]
        alone = sorted(set(range(len(pairs))) - {i for members in shared for i in members},
                       key=lambda i: -len(inputs[i]))
        results = [None] * len(pairs)
        bar = True if disable or not self.progress else None  # None: a bar on a terminal only
        with tqdm(total=len(pairs), desc=desc, unit="request", disable=bar, leave=False) as done:
            for members in shared:
                logits = self.logits_after_shared_context(pairs[members[0]][0], [pairs[i][1] for i in members])
                for i, rows in zip(members, logits):
                    results[i] = score_rows(rows, pairs[i][1])
                done.update(len(members))
            for batch in (alone[i : i + self.batch_size] for i in range(0, len(alone), self.batch_size)):
                lengths = [len(inputs[i]) for i in batch]
                ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : lengths[row]] = torch.tensor(inputs[i])
                positions = [(row, end - len(pairs[i][1]), end) for row, (i, end) in enumerate(zip(batch, lengths))]
                logits = self.logits_at(ids, positions).split([end - start for _, start, end in positions])
                for i, rows in zip(batch, logits):
                    results[i] = score_rows(rows, pairs[i][1])
                done.update(len(batch))
        return results

    def logits_after_shared_context(self, context: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Each continuation's logits: the context prefilled once, then all continuations (right-padded) from
        copies of its recurrent state."""
        cache = self.model.new_cache(1)
        first = self.model.output(self.model.hidden_states(torch.tensor([context]), cache)[:, -1:])[0]
        rests = [continuation[:-1] for continuation in continuations]
        longest = max(map(len, rests))
        if longest == 0:
            return [first] * len(continuations)
        ids = torch.zeros(len(rests), longest, dtype=torch.long)
        for row, rest in enumerate(rests):
            ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        hidden = self.model.hidden_states(ids, stack_states([cache] * len(rests)))
        later = self.model.output(torch.cat([hidden[row, : len(rest)] for row, rest in enumerate(rests)])[None])[0]
        return [torch.cat([first, rows]) for rows in later.split([len(rest) for rest in rests])]

    def logits_at(self, ids: torch.Tensor, positions: list[tuple[int, int, int]]) -> torch.Tensor:
        """The logits at positions [start, end) of each (row, start, end), concatenated: for our runtime, the head
        runs on those positions alone."""
        if isinstance(self.model, MambaLM):
            hidden = self.model.hidden_states(ids)
            picked = torch.cat([hidden[row, start:end] for row, start, end in positions])
            return self.model.output(picked[None])[0]
        check_logits(self.model, ids.numel(), "scoring a batch")
        logits = self.model(ids)
        return torch.cat([logits[row, start:end] for row, start, end in positions])

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        return self.score(pairs, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over lm-eval's disjoint rolling windows of max_length tokens, the first
        predicted from the prefix token."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(pairs, "loglikelihood_rolling", disable_tqdm)):
            totals[owner] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string. Each context is
        prefilled on its own, then a batch decodes together from the stacked recurrent states: no padding at all."""
        if not isinstance(self.model, MambaLM):
            raise InputError("generation needs a model of the mambaquant runtime (a MambaLM)")
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = True if disable_tqdm or not self.progress else None  # None: a bar on a terminal only
        for batch in tqdm(batches, desc="generate_until", unit="batch", disable=bar, leave=False):
            settings = [generation_settings(requests[i].args[1]) for i in batch]
            groups = {}
            for i, setting in zip(batch, settings):
                groups.setdefault((setting[1], setting[2]), []).append((i, setting[0]))
            for (max_tokens, temperature), members in groups.items():
                texts = self.generate([requests[i].args[0] for i, _ in members], [u for _, u in members], max_tokens,
                                      temperature)
                for (i, _), text in zip(members, texts):
                    results[i] = text
        return results

    def generate(self, contexts: list[str], stops: list[list[str]], max_tokens: int, temperature: float) -> list[str]:
        """Continuations of `contexts` decoded together. Attention's KV caches of prompts of different lengths do
        not stack (no padding masks): a model with attention decodes such prompts one at a time."""
        attention = any(isinstance(state, (KVCache, ParallelState, ZambaState)) for state in self.model.new_cache(1))
        if attention and len(contexts) > 1:
            return [self.generate([context], [stop], max_tokens, temperature)[0]
                    for context, stop in zip(contexts, stops)]
        caches, logits = [], []
        for context in contexts:
            ids = (self.tokenizer.encode(context) or [self.prefix_token_id])[-self.max_length :]
            cache = self.model.new_cache(1)
            logits.append(self.model(torch.tensor([ids]), cache)[:, -1])
            caches.append(cache)
        cache = stack_states(caches)
        logits = torch.cat(logits)
        new = [[] for _ in contexts]
        texts = ["" for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_tokens):
            token = sample(logits, temperature, None, self.generator)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == self.eot_id:
                    done[row] = True
                    continue
                new[row].append(t)
                texts[row] = self.tokenizer.decode(new[row])
                done[row] = any(stop in texts[row] for stop in stops[row])
            if all(done):
                break
            logits = self.model(token[:, None], cache)[:, -1]
        return [cut_at_stops(text, stop) for text, stop in zip(texts, stops)]


def score_rows(logits: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    """(sum of the target's log-probabilities, whether every target token is the argmax)."""
    if not target:
        return 0.0, True
    logprobs = logits.float().log_softmax(-1)
    target = torch.tensor(target, dtype=torch.long)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def generation_settings(kwargs: dict) -> tuple[list[str], int, float]:
    """(stop strings, max new tokens, temperature; 0 for greedy) from a task's generation kwargs."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_tokens = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
    return until, max_tokens, temperature


def cut_at_stops(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def stack_states(caches: list[list]) -> list:
    """Per-layer states of several batch-1 runs as one batch: recurrent states, KV caches of equal lengths, and
    None for blocks that keep no state."""
    stacked = []
    for states in zip(*caches):
        if states[0] is None:
            stacked.append(None)
        else:
            stacked.append(stack_state(states))
    return stacked


def stack_state(states: list):
    if isinstance(states[0], (ParallelState, ZambaState)):
        return type(states[0])(ssm=stack_state([s.ssm for s in states]), kv=stack_state([s.kv for s in states]))
    if isinstance(states[0], KVCache):
        return KVCache(k=torch.cat([s.k for s in states]), v=torch.cat([s.v for s in states]))
    return SSMState(conv=torch.cat([s.conv for s in states]), h=torch.cat([s.h for s in states]))


def main_metric(task: str, metrics: dict) -> str:
    """The metric the papers report for a task, else accuracy, else the task's first metric."""
    if task in PAPER_TASKS and PAPER_TASKS[task] in metrics:
        return PAPER_TASKS[task]
    return "acc" if "acc" in metrics else next(iter(metrics))


def lm_eval_results(model, source: str, config: LMEvalConfig, tokenizer: str | None = None,
                    progress: bool = True) -> list[tuple[str, Result]]:
    """Run the lm-eval tasks of `config` on `model` (a model, or a MambaQuantLM of it): [(task, Result)], the
    task's main metric as the value (accuracies in %) and every metric in `extra`; with several accuracy tasks,
    their mean last, as the papers' tables. Tasks and their data are resolved first, so a task that cannot run
    fails before the model does."""
    from lm_eval.evaluator import evaluate  # not simple_evaluate: no git call, no logging set-up, no task index

    loaded, origins = load_tasks(config.tasks, config.data, config.include, config.num_fewshot, config.trust_code)
    adapter = model if isinstance(model, MambaQuantLM) else MambaQuantLM(model, tokenizer=tokenizer,
                                                                          batch_size=config.batch_size,
                                                                          progress=progress)
    limit = config.limit
    with quiet():
        output = evaluate(adapter, {"tasks": loaded, "groups": {}, "group_map": {}}, limit=limit, bootstrap_iters=0,
                          log_samples=False)
    rows, accuracies = [], []
    for task in loaded:
        raw = output["results"][task]
        metrics = {key.split(",")[0]: value for key, value in raw.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
        metric = main_metric(task, metrics)
        accuracy = metric.startswith(("acc", "exact_match", "f1"))
        shots = output["configs"][task].get("num_fewshot") or 0
        quick = f"first {limit} documents only (a quick look), " if limit else ""
        protocol = (f"lm-evaluation-harness {LM_EVAL_VERSION}, {task} ({origins[task]}), {quick}{shots}-shot, "
                    f"{metric}{' %' if accuracy else ''}")
        higher = output.get("higher_is_better", {}).get(task, {}).get(metric, accuracy)
        result = Result(source, metric, 100 * metrics[metric] if accuracy else metrics[metric], higher, protocol,
                        output["n-samples"][task]["effective"], extra=metrics)
        rows.append((task, result))
        if accuracy:
            accuracies.append((task, result))
    if len(accuracies) > 1:
        names = ", ".join(task for task, _ in accuracies)
        mean = sum(result.value for _, result in accuracies) / len(accuracies)
        protocol = f"mean of the main metric of {names} (lm-evaluation-harness {LM_EVAL_VERSION}) %"
        rows.append(("lm-eval mean", Result(source, "mean_accuracy", mean, True, protocol,
                                            sum(result.samples for _, result in accuracies))))
    return rows
