"""Text <-> token ids: raw bytes for byte-level models, the GPT-NeoX BPE for the state-spaces Mamba models."""

import os
from functools import lru_cache
from pathlib import Path

from .data import shared_data_dir
from .errors import InputError
from .inputs import regular_file

MAX_TOKENIZER_BYTES = 256 * 2**20  # GPT-NeoX's tokenizer.json is 2 MiB; the largest published ones are ~40 MiB


class ByteTokenizer:
    eot_id = None  # bytes have no end-of-text token

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))  # bytes that are not UTF-8 come back as given

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception for a bad file
            raise InputError(f"{path}: not a tokenizer.json file ({e})") from None
        self.eot_id = self.tokenizer.token_to_id("<|endoftext|>")  # GPT-NeoX's document separator, where present
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the text is not valid UTF-8; expected UTF-8 text for a BPE tokenizer") from None
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@lru_cache(maxsize=4)
def tokenizer_for(vocab_size: int, path: str | Path | None = None):
    """Byte-level for vocabularies of 256 to 511 entries; otherwise a tokenizer.json (`path`, else the GPT-NeoX
    tokenizer from the data directory)."""
    if path is None and 256 <= vocab_size < 512:
        return ByteTokenizer()
    if path is None:
        data = shared_data_dir()
        path = data / "tokenizer" / "20B_tokenizer.json" if data else None
        if path is None or not path.is_file():
            raise InputError(
                f"a model with a {vocab_size}-token vocabulary needs a tokenizer: pass --tokenizer PATH "
                "(a tokenizer.json, e.g. GPT-NeoX-20B's for the state-spaces Mamba models)"
            )
    return BPETokenizer(regular_file(path, "a tokenizer.json", MAX_TOKENIZER_BYTES))


def own_tokenizer(source) -> Path | None:
    """The tokenizer.json inside a model directory or the cached snapshot of a hub id (a Hugging Face model ships
    its own), if there is one."""
    from .loaders.hub import cached_snapshot_of

    if not isinstance(source, (str, Path)) or not str(source):
        return None
    directory = Path(source) if os.path.exists(source) else cached_snapshot_of(source)
    if directory is not None and directory.is_dir() and (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    return None
