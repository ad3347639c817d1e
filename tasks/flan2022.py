"""The Flan 2022 recipe (`mixing.FLAN_2022`) over the collections this project has.

Mixture `flan2022`, registered with `mixing.add_recipe`. Of the recipe's five
collections (flan 0.4, t0 0.32, niv2 0.2, cot 0.05, dialog 0.03) only `cot`
is here: the Flan CoT training sets of tasks/flan_cot.py, every variant. The
missing collections are left out and the shares renormalised over the
present ones, so today `flan2022` is `flan2022_cot` alone: the CoT tasks
mixed example-proportionally (cap 100,000 examples per task), each dataset's
rows split evenly over its variants. Add a collection's task names to
COLLECTIONS and its share follows the recipe. `flan-jax data list` shows
what is missing.
"""

from tasks import flan_cot, mixing

MIXTURE = "flan2022"
COLLECTIONS: dict[str, list[str]] = {
    "cot": [flan_cot.task_name(d.name, v) for d in flan_cot.DATASETS for v in d.spec.variants],
}

# No warning at import (every command imports tasks); `data list` reports the gap.
RECIPE = mixing.add_recipe(MIXTURE, COLLECTIONS, warn=False)
