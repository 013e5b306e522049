from pathlib import Path

import pytest

from flora_hf.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe["output_dir"] and recipe["search"]["budgets"]
    if recipe["spvit"]["enabled"]:
        assert 0 < recipe["spvit"]["macs_target"] <= 1 and recipe["spvit"]["search"]
