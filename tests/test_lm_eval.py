"""The lm-evaluation-harness adapter: its log-likelihoods against direct computations with the runtime, models whose
answers are known (uniform: chance exactly; an oracle: 100 %), generation against the runtime's greedy decoding,
LAMBADA through lm-eval against the built-in protocol, and the command line's routes and refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lm_eval.api.instance import Instance  # lm-eval is in the test extra

from mambaquant.data import shared_data_dir
from mambaquant.errors import InputError
from mambaquant.evaluation import lm_eval
from mambaquant.evaluation.harness import MambaQuantLM
from mambaquant.evaluation.local_tasks import PAPER_TASKS, TASKS_DIR, LMEvalConfig, load_tasks, task_names
from mambaquant.evaluation.text import lambada, lambada_passages
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, init_weights

from .cli_cases import assert_refused

LAMBADA_SLICE = Path(__file__).parent / "data" / "lambada_openai_300.jsonl"


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def byte_lm(mamba2: bool = False, seed: int = 0) -> MambaLM:
    config = (Mamba2LMConfig(d_model=64, n_layer=2, d_state=16, head_dim=16, vocab_size=256, tie_embeddings=False)
              if mamba2 else LMConfig(d_model=64, n_layer=2, d_state=8, vocab_size=256, tie_embeddings=False))
    return init_weights(MambaLM(config), seed=seed).eval()


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One sequence, no batching, no padding: the log-probability of each continuation token after what precedes."""
    ids = torch.tensor([context + continuation])
    logprobs = model(ids[:, :-1])[0, len(context) - 1 :].float().log_softmax(-1)
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


PAIRS = [("To be, or not to be", ": that is the question"), ("ROMEO:\n", "But soft!"), ("", "O Romeo, Romeo"),
         ("What light through yonder ", "window breaks"), ("A", "B"), ("Good night, good night! Parting is", " such"),
         ("ROMEO:\n", "B"), ("ROMEO:\n", "What light"), ("A", "Be"), ("A", "C")]  # contexts shared, as choices are


@pytest.mark.parametrize("mamba2", [False, True], ids=["mamba1", "mamba2"])
def test_loglikelihood_equals_a_direct_computation_in_right_padded_batches(mamba2):
    model = byte_lm(mamba2)
    adapter = MambaQuantLM(model, batch_size=4, progress=False)
    got = adapter.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        context_ids, continuation_ids = adapter.encode_pair(context, continuation)
        expected, expected_greedy = direct_loglikelihood(model, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4) and greedy == expected_greedy
    assert adapter.encode_pair("What light through yonder ", "window")[1] == list(b" window")  # spaces move over
    assert adapter.encode_pair("", "O")[0] == [10]  # a byte model's documents start after a newline
    # the greedy flag is true when every continuation token is the argmax
    context = list(b"To be, or not")
    greedy = model.generate(torch.tensor([context]), 3, temperature=0)[0].tolist()
    text = bytes(greedy).decode("utf-8", errors="surrogateescape")  # how the byte tokenizer reads bytes back
    assert adapter.loglikelihood(requests("loglikelihood", [("To be, or not", text)]))[0][1]


def test_rolling_loglikelihood_over_windows_and_without():
    model = byte_lm()
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    tokens = list(text.encode())
    whole = MambaQuantLM(model, max_length=2048, progress=False)
    full, _ = direct_loglikelihood(model, [10], tokens)
    assert whole.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))[0] == pytest.approx(full, abs=1e-3)
    windowed = MambaQuantLM(model, max_length=16, batch_size=3, progress=False)
    expected, predicted = direct_loglikelihood(model, [10], tokens[:16])[0], 16  # lm-eval's disjoint windows
    while predicted < len(tokens):
        end = predicted + min(len(tokens) - predicted, 16)
        expected += direct_loglikelihood(model, tokens[end - 17 : predicted], tokens[predicted:end])[0]
        predicted = end
    got = windowed.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), ("",)]))
    assert got[0] == pytest.approx(expected, abs=1e-3) and got[1] == 0.0
    assert got[0] < full  # less context, lower likelihood: the windows did cut the text


def test_generate_until_equals_greedy_decoding_and_stops_at_the_stop_string():
    model = byte_lm(seed=3)
    adapter = MambaQuantLM(model, batch_size=3, progress=False)
    contexts = ["First Citizen:\nBefore we proceed", "All:\nSpeak", "We are accounted poor citizens, the patricians"]
    got = adapter.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]))
    for context, text in zip(contexts, got):  # prefilled alone, decoded together from stacked states
        new = model.generate(torch.tensor([list(context.encode())]), 12, temperature=0)[0].tolist()
        assert text == bytes(new).decode("utf-8", errors="replace")
    stop = got[0][3:5]
    cut = adapter.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 12})]))
    assert cut[0] == got[0].split(stop, 1)[0]


def test_a_uniform_model_scores_chance_exactly_and_an_oracle_scores_everything():
    model = byte_lm()
    torch.nn.init.zeros_(model.lm_head.weight)  # every continuation equally likely: ties go to the first choice
    (_, result), = lm_eval(model, LMEvalConfig("shakespeare_mc", limit=40))
    assert result.value == 25.0 and result.extra["acc_norm"] == 0.25  # the gold choice cycles through 4 places

    docs = [json.loads(line) for line in (TASKS_DIR / "shakespeare_mc.jsonl").read_text().splitlines()[:12]]
    gold = [list((doc["context"] + doc["choices"][doc["label"]]).encode()) for doc in docs]
    (_, result), = lm_eval(Oracle(gold, 256), LMEvalConfig("shakespeare_mc", limit=12))
    assert result.value == 100.0 and result.samples == 12


class Oracle(torch.nn.Module):
    """A model that knows some token sequences: after any prefix of one, all its mass on the next token."""

    def __init__(self, sequences: list[list[int]], vocab: int):
        super().__init__()
        self.config = LMConfig(d_model=1, n_layer=1, vocab_size=vocab)
        self.next = {tuple(s[: i + 1]): s[i + 1] for s in sequences for i in range(len(s) - 1)}

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for row in range(ids.shape[0]):
            sequence = ids[row].tolist()
            for j in range(len(sequence)):
                token = self.next.get(tuple(sequence[: j + 1]))
                if token is not None:
                    logits[row, j, token] = 40.0
        return logits


def gpt_neox_tokenizer() -> Path:
    data = shared_data_dir()
    path = data / "tokenizer" / "20B_tokenizer.json" if data else None
    if path is None or not path.is_file():
        pytest.skip("the GPT-NeoX tokenizer is in the data directory (../shared/data/tokenizer)")
    return path


@pytest.mark.parametrize("model_kind", ["random-130m", "oracle-of-half"])
def test_lambada_through_lm_eval_equals_the_built_in_protocol(model_kind):
    """LAMBADA passages through both routes, the same accuracy and last-word perplexity: on a random mamba-130m
    configuration (200 passages), and on an oracle that knows every other passage (all 300: 50 %, so the greedy
    test is not trivially all-wrong)."""
    from mambaquant.tokenizer import tokenizer_for

    tokenizer_path = gpt_neox_tokenizer()
    tokenizer = tokenizer_for(50280, tokenizer_path)
    passages = lambada_passages(LAMBADA_SLICE)
    if model_kind == "random-130m":
        passages = passages[:200]
        model = init_weights(MambaLM(LMConfig(d_model=768, n_layer=24, vocab_size=50280)), seed=0).eval()
    else:
        model = Oracle([tokenizer.encode(p.rsplit(" ", 1)[0]) + tokenizer.encode(" " + p.rsplit(" ", 1)[1])
                        for p in passages[::2]], 50280)
    accuracy, word_ppl, count = lambada(model, tokenizer, passages)
    config = LMEvalConfig("lambada_openai", limit=len(passages), data={"lambada_openai": str(LAMBADA_SLICE)},
                          batch_size=16)
    (task, result), = lm_eval(model, config, model_kind, str(tokenizer_path))
    assert task == "lambada_openai" and result.samples == count == len(passages)
    assert result.value == pytest.approx(accuracy, abs=1e-9)
    assert accuracy == (0.0 if model_kind == "random-130m" else 50.0)
    assert result.extra["perplexity"] == pytest.approx(word_ppl, rel=1e-4)
    assert "user data" in result.protocol and "0-shot" in result.protocol


def test_tasks_resolve_before_any_model_runs():
    with pytest.raises(InputError, match="close ones: shakespeare_mc"):
        load_tasks("shakespear_mc")
    with pytest.raises(InputError, match=r"hellaswag: its data \(Rowan/hellaswag\) cannot be read.*--lm-eval-data"):
        load_tasks("hellaswag")
    with pytest.raises(InputError, match="no such file; expected a task data file"):
        load_tasks("lambada_openai", data={"lambada_openai": "/nonexistent/lambada.jsonl"})
    with pytest.raises(InputError, match="not among the tasks"):
        load_tasks("shakespeare_mc", data={"lambada_openai": str(LAMBADA_SLICE)})
    with pytest.raises(InputError, match="num_fewshot must be 0 or more"):
        LMEvalConfig("shakespeare_mc", num_fewshot=-1)
    assert task_names("paper, shakespeare_mc") == [*PAPER_TASKS, "shakespeare_mc"]


def test_missing_lm_eval_is_one_line(monkeypatch):
    import sys

    from mambaquant.evaluation.local_tasks import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[eval\]"'):
        require_lm_eval()


def test_a_user_task_yaml_over_local_files_from_any_directory(tmp_path, monkeypatch):
    """A generation task and a multiple-choice task of the user's, data beside the YAML, run from elsewhere; the
    generation task's exact-match equals the runtime's own greedy continuation."""
    import mambaquant

    model = mambaquant.load("mamba-shakespeare")
    prompts = ["KING RICHARD III:\nNow is the winter of our disc", "ROMEO:\nBut soft, what light through yon"]
    greedy = [bytes(model.generate(torch.tensor([list(p.encode())]), 8, temperature=0)[0].tolist()).decode()
              for p in prompts]
    folder = tmp_path / "tasks"
    folder.mkdir()
    answers = [greedy[0], "xyzzy"]  # the first is what the model says, the second is not
    (folder / "complete.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                                   for p, a in zip(prompts, answers)))
    (folder / "complete.yaml").write_text(
        "task: shakespeare_complete\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: complete.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "target_delimiter: ''\ngeneration_kwargs:\n  until: []\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    monkeypatch.chdir(tmp_path.parent)
    (task, result), = lm_eval(model, LMEvalConfig(str(folder / "complete.yaml")), "mamba-shakespeare")
    assert task == "shakespeare_complete" and result.value == 50.0 and result.metric == "exact_match"
    assert "user task" in result.protocol and f"data: {folder / 'complete.jsonl'}" in result.protocol
    shutil.copy(TASKS_DIR / "shakespeare_mc.yaml", folder / "mine.yaml")  # its !function is beside the original
    with pytest.raises(InputError, match="runs Python code .* --trust-task-code"):
        load_tasks(str(folder / "mine.yaml"))
    with pytest.raises(InputError, match="not a readable lm-eval task YAML"):
        load_tasks(str(folder / "mine.yaml"), trust_code=True)


def test_cli_eval_and_compare_with_lm_eval_tasks(cli, tmp_path):
    data = tmp_path / "data" / "lambada"
    data.mkdir(parents=True)
    shutil.copy(LAMBADA_SLICE, data / "lambada_test.jsonl")
    result = cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--limit", "8", "--json",
                     timeout=300)
    assert result.code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["task"] == "shakespeare_mc" and row["samples"] == 8 and "quick look" in result.stderr
    result = cli.run("eval", "mamba-shakespeare", "--lm-eval", "lambada_openai", "--limit", "4",
                     env={"MAMBAQUANT_DATA": str(tmp_path / "data")}, timeout=300)
    assert result.code == 0, result.stderr
    assert "lambada_openai acc = " in result.stdout and "data directory: lambada/lambada_test.jsonl" in result.stdout
    out = tmp_path / "rows.json"
    result = cli.run("compare", "mamba-shakespeare", "--methods", "fp,rtn", "--bits", "w8a8", "--granularity", "tensor",
                     "--lm-eval", "shakespeare_mc,lambada_openai", "--limit", "8", "--json", out,
                     env={"MAMBAQUANT_DATA": str(tmp_path / "data")}, timeout=600)
    assert result.code == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in ("fp", "rtn")
                                                          for t in ("shakespeare_mc", "lambada_openai", "lm-eval mean")}
    fp = {r["task"]: r["value"] for r in rows if r["method"] == "fp"}
    assert all(r["fp_value"] == fp[r["task"]] for r in rows)
    assert fp["lm-eval mean"] == pytest.approx((fp["shakespeare_mc"] + fp["lambada_openai"]) / 2)


def test_cli_refusals(cli):
    # the task is checked before the model is loaded: a bad task wins over a bad source
    assert_refused(cli.run("eval", "/nonexistent/model", "--lm-eval", "shakespear_mc"), "close ones: shakespeare_mc")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "hellaswag"), "hellaswag", "--lm-eval-data")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--num-fewshot", "-1"),
                   "--num-fewshot")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--limit", "4"), "--limit", "--lm-eval")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--eval-samples", "4"),
                   "--eval-samples")
    assert_refused(cli.run("eval", "vim-cifar10", "--lm-eval", "shakespeare_mc"), "language model")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--lm-eval-data", "nofile"),
                   "TASK=FILE")


def test_more_few_shot_examples_than_documents_are_refused_before_the_model(cli):
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--num-fewshot", "1000000",
                           "--limit", "2"), "lm-eval task shakespeare_mc", "has 200 documents", "--num-fewshot 200")
    assert_refused(cli.run("compare", "mamba-shakespeare", "--methods", "fp", "--lm-eval", "shakespeare_mc",
                           "--num-fewshot", "201", "--limit", "2"), "shakespeare_mc", "has 200 documents")
    loaded, _ = load_tasks("shakespeare_mc", num_fewshot=200)  # all of them: lm-eval samples 200 of 200
    assert loaded["shakespeare_mc"].get_config("num_fewshot") == 200


def test_few_shot_examples_from_the_evaluated_split_leave_the_document_out(tmp_path):
    """Drawn from the split being evaluated, a document's examples exclude it: one fewer is available."""
    task = tmp_path / "fewshot_from_test.yaml"
    task.write_text(f"""task: fewshot_from_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASKS_DIR / "shakespeare_mc.jsonl"}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
""")
    with pytest.raises(InputError, match="fewshot_from_test: 200 few-shot .* has 200 documents; expected "
                                         "--num-fewshot 199 or fewer"):
        load_tasks(str(task), num_fewshot=200)
    loaded, _ = load_tasks(str(task), num_fewshot=199)
    assert loaded["fewshot_from_test"].get_config("num_fewshot") == 199


class Recording(MambaQuantLM):
    """The adapter, keeping every (context, continuation) it was asked to score."""

    def score(self, pairs, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + list(pairs)
        return super().score(pairs, *args, **kwargs)


def test_few_shot_examples_reach_the_model():
    model = byte_lm()
    zero, two = Recording(model, progress=False), Recording(model, progress=False)
    (_, zero_result), = lm_eval(zero, LMEvalConfig("shakespeare_mc", limit=4))
    (_, two_result), = lm_eval(two, LMEvalConfig("shakespeare_mc", limit=4, num_fewshot=2))
    assert "0-shot" in zero_result.protocol and "2-shot" in two_result.protocol
    assert len(two.seen) == len(zero.seen) == 16
    assert min(len(c) for c, _ in two.seen) > max(len(c) for c, _ in zero.seen) + 2 * 200  # two 200-byte examples


def test_lm_evals_own_command_line_runs_our_model(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mambaquant.harness", "--model", "mambaquant",
                             "--model_args", "pretrained=mamba-shakespeare", "--batch_size", "4",
                             "--tasks", "shakespeare_mc", "--limit", "8"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "|shakespeare_mc|" in result.stdout.replace(" ", "") and "acc_norm" in result.stdout


def test_a_model_directory_brings_its_own_tokenizer_and_a_wrong_one_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import mambaquant

    model = init_weights(MambaLM(LMConfig(d_model=32, n_layer=1, d_state=4, vocab_size=600)), seed=0).eval()
    directory = mambaquant.save(model, tmp_path / "my-lm")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["to be or not to be, that is the question"] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    adapter = MambaQuantLM(str(directory), progress=False)
    assert adapter.tokenizer.encode("to be") == tokenizer.encode("to be").ids
    assert adapter.prefix_token_id == tokenizer.token_to_id("<|endoftext|>")
    (_, result), = lm_eval(mambaquant.load(directory), LMEvalConfig("shakespeare_mc", limit=4), str(directory))
    assert result.samples == 4
    if shared_data_dir() is not None and (shared_data_dir() / "tokenizer" / "20B_tokenizer.json").is_file():
        with pytest.raises(InputError, match="more than the model's vocabulary of 600"):
            MambaQuantLM(model, progress=False)  # GPT-NeoX's 50,277 tokens cannot index 600 embeddings
