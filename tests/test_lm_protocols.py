"""The GPT-NeoX language-model protocols (WikiText-2 GPTQ-convention perplexity, LAMBADA last-word accuracy),
exercised on a random-initialised mamba-130m configuration with user-given data paths."""

import json
import math

import pytest
import torch

from mambaquant.data import shared_data_dir
from mambaquant.errors import InputError
from mambaquant.evaluation import evaluate
from mambaquant.evaluation.text import lambada, perplexity, wikitext2_test_text
from mambaquant.runtime import LMConfig, MambaLM, init_weights
from mambaquant.tokenizer import tokenizer_for

WORDS = ("the river ran past the old mill and the miller said that the water was cold . " * 150).split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A WikiText-style raw file (CRLF, no blank lines), a LAMBADA-style jsonl and a tokenizer.json: GPT-NeoX's
    from the data directory when present, else a small BPE trained on the same text."""
    root = tmp_path_factory.mktemp("lm")
    lines = [" = Title = "] + [" " + " ".join(WORDS[i : i + 60]) for i in range(0, len(WORDS), 60)]
    (root / "wiki.test.raw").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    passages = [" ".join(WORDS[i : i + 30]) for i in (0, 7, 13)]
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    data = shared_data_dir()
    if data and (data / "tokenizer" / "20B_tokenizer.json").is_file():
        return root, data / "tokenizer" / "20B_tokenizer.json"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tokenizer.save(str(root / "tokenizer.json"))
    return root, root / "tokenizer.json"


def test_wikitext_text_is_joined_with_blank_lines(files):
    root, _ = files
    text = wikitext2_test_text(root / "wiki.test.raw")
    assert text.startswith(" = Title = \n\n the river") and "\r" not in text and "\n\n\n" not in text


def test_perplexity_convention_is_exp_mean_nll_over_non_overlapping_windows():
    vocab = 50
    model = init_weights(MambaLM(LMConfig(d_model=32, n_layer=1, d_state=4, vocab_size=vocab)), seed=0).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: uniform predictions everywhere
    tokens = torch.randint(0, vocab, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    ppl, windows = perplexity(model, tokens, window=2048)
    assert windows == 2 and ppl == pytest.approx(vocab, rel=1e-5)
    assert perplexity(model, tokens, window=2048, max_windows=1)[1] == 1
    with pytest.raises(InputError, match="fewer than one window"):
        perplexity(model, tokens[:2000], window=2048)


class Oracle(torch.nn.Module):
    """Predicts the passage's true next token (or always token 0), to pin LAMBADA's scoring."""

    def __init__(self, ids: list[int], vocab: int, right: bool):
        super().__init__()
        self.ids, self.vocab, self.right = ids, vocab, right

    def forward(self, x):
        logits = torch.zeros(1, x.shape[1], self.vocab)
        for i in range(x.shape[1]):
            logits[0, i, self.ids[i + 1] if self.right else 0] = 30.0
        return logits


def test_lambada_scores_the_last_word_greedily(files):
    _, tokenizer_path = files
    tokenizer = tokenizer_for(50280, tokenizer_path)
    passage = "the miller said that the water was cold"
    ids = tokenizer.encode("the miller said that the water was") + tokenizer.encode(" cold")
    for right, expected in ((True, 100.0), (False, 0.0)):
        accuracy, word_ppl, count = lambada(Oracle(ids, 50280, right), tokenizer, [passage])
        assert (accuracy, count) == (expected, 1) and (word_ppl < 1.01) == right


@pytest.fixture(scope="module")
def mamba_130m():
    return init_weights(MambaLM(LMConfig(d_model=768, n_layer=24, vocab_size=50280)), seed=0).eval()


def test_protocols_on_random_130m(files, mamba_130m):
    root, tokenizer = files
    wiki = evaluate(mamba_130m, "random-130m", 1, task="wikitext2", data=str(root / "wiki.test.raw"),
                    tokenizer=str(tokenizer))
    assert wiki.metric == "perplexity" and wiki.samples == 1 and "2048-token windows" in wiki.protocol
    assert 1 < wiki.value < 10 * 50280 and math.isfinite(wiki.value)
    lam = evaluate(mamba_130m, "random-130m", task="lambada", data=str(root / "lambada.jsonl"),
                   tokenizer=str(tokenizer))
    assert lam.metric == "accuracy" and lam.samples == 3 and 0 <= lam.value <= 100
    assert math.isfinite(lam.extra["last_word_perplexity"])


def test_protocol_errors_are_one_line(files, mamba_130m, tmp_path):
    _, tokenizer = files
    with pytest.raises(InputError, match="none.raw: no such file; expected the WikiText-2 raw test split"):
        evaluate(mamba_130m, "m", 1, task="wikitext2", data=str(tmp_path / "none.raw"), tokenizer=str(tokenizer))
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(InputError, match="one JSON object"):
        evaluate(mamba_130m, "m", 1, task="lambada", data=str(tmp_path / "bad.jsonl"), tokenizer=str(tokenizer))
    with pytest.raises(InputError, match="does not apply"):
        evaluate(mamba_130m, "m", 1, task="cifar10")
