import json
import subprocess
import sys

import pytest
import torch

import mambaquant
from mambaquant.evaluation import evaluate
from mambaquant.zoo import ZOO, card


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_loads_and_reproduces_its_card(name):
    model = mambaquant.load(name)
    final = card(name)["final"]
    assert sum(p.numel() for p in model.parameters()) == card(name)["parameters"]
    result = evaluate(model, name)
    assert result.metric == final["metric"]
    if "shipped_subset" in final and "shipped" in result.protocol:  # a fresh clone without the full test split
        final = final["shipped_subset"]
    assert result.value == pytest.approx(final["value"], abs=0.01)


def test_typeseg_zoo_weights_are_the_packages():
    from mambaquant.loaders.typeseg import packaged_npz

    zoo, package = mambaquant.load("typeseg").state_dict(), mambaquant.load(packaged_npz()).state_dict()
    assert zoo.keys() == package.keys() and all(torch.equal(zoo[k], package[k]) for k in zoo)


def test_zoo_and_eval_cli():
    out = subprocess.run([sys.executable, "-m", "mambaquant", "zoo", "--json"], capture_output=True, text=True, check=True)
    assert {row["name"] for row in json.loads(out.stdout)} == set(ZOO)
    out = subprocess.run([sys.executable, "-m", "mambaquant", "eval", "typeseg", "--json", "--eval-samples", "2"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["model"] == "typeseg" and result["metric"] == "byte_accuracy" and 0 <= result["value"] <= 100
