import pytest
import torch

from mambaquant.runtime import LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights


@pytest.fixture
def small_lm() -> MambaLM:
    config = LMConfig(d_model=64, n_layer=3, d_state=8, vocab_size=300, tie_embeddings=False)
    return init_weights(MambaLM(config), seed=1).eval()


@pytest.fixture
def small_vim() -> VisionMamba:
    config = VisionConfig(d_model=48, n_layer=2, d_state=8, img_size=32, patch_size=8, stride=8, num_classes=10)
    model = init_weights(VisionMamba(config), seed=2).eval()
    with torch.no_grad():  # non-trivial A and D so both branches matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="session")
def cli():
    """The real CLI, each command in its own forked process (tests/cli_server.py): `cli.run(*argv, cwd=, env=)`."""
    from .cli_cases import CliServer

    server = CliServer()
    yield server
    server.close()
    SUMMARY.append(f"{len(server.exit_codes)} CLI commands run in forked processes, "
                   f"{sum(code == 2 for code in server.exit_codes)} of them refused with exit 2")


SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY:
        terminalreporter.write_line(line)
