"""typeseg's trained Mamba through our runtime equals the package's own numpy forward."""

import numpy as np
import torch
from typeseg import _mamba_kernel as typeseg_kernel

import mambaquant
from mambaquant.loaders.typeseg import packaged_npz, typeseg_tokens
from mambaquant.runtime import MambaTagger

from .helpers import rel_err


def package_logits(text: str) -> np.ndarray:
    from typeseg._runtime import _manifest, _weights
    from typeseg._tokenize import text_to_bytes

    config = _manifest()["mamba"]
    return typeseg_kernel.mamba_forward(
        np, _weights(config["file"]), text_to_bytes(text), n_layers=config["n_layers"], d_state=config["d_state"],
        dt_rank=config["dt_rank"], d_conv=config["d_conv"],
    )


@torch.no_grad()
def test_typeseg_matches_package_forward(tmp_path):
    model = mambaquant.load(packaged_npz())
    assert isinstance(model, MambaTagger) and model.config.bidirectional == "shared"
    text = (
        '<html><body style="color: red">\n<script>const x = {"a": [1, 2]};</script>\n'
        "def main(argv):\n    return sorted(argv, key=len)  # ¤ non-ASCII é\n"
        "SELECT name FROM users WHERE id = 3;\n"
    ) * 3
    expected = torch.from_numpy(package_logits(text))
    ours = model(typeseg_tokens(text.encode("utf-8"))[None])[0]
    assert rel_err(ours, expected) < 1e-4
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() == 1.0
    mambaquant.save(model, tmp_path / "typeseg")
    assert torch.equal(mambaquant.load(tmp_path / "typeseg")(typeseg_tokens(b"x = 1\n")[None]),
                       model(typeseg_tokens(b"x = 1\n")[None]))
