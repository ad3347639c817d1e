"""The Flan 2022 recipe (`mixing.FLAN_2022`) over the collections this project has.

Mixture `flan2022`: the recipe's five collections (flan 0.4, t0 0.32, niv2 0.2,
cot 0.05, dialog 0.03), each present one at its share; missing ones are
left out and the shares renormalised over the rest (`flan-jax data list`
names them). Where a collection comes from:

  the published export  when $FLAN_JAX_COLLECTION_DIR (or `flan_collection/`
                        in the data directory) holds its submixture
                        (tasks/collection.py). Every (task, template type)
                        of it is a SeqIO task `{prefix}_{task}_{template}`
                        (prefixes flan2021, t0, niv2, cot, dialog), and
                        `flan2022_{collection}` is the submixture streamed
                        once and thinned to the recipe: template types
                        equally weighted, tasks example-proportional up to
                        the collection's cap; in cot and dialog the
                        input-inversion tasks (CoT-II, Dialog-II: names
                        ending "_ii") weigh 0.3 against 1 for the rest of
                        each template type, as in FLAN's mixtures.py.
  the Flan CoT TSVs     for `cot` when the export lacks it: the tasks of
                        tasks/flan_cot.py, every variant, mixed
                        example-proportionally (`flan2022_cot`, a mixture).

Your own tasks join it as any mixture does, e.g. in a file of tasks/:
`mixing.add_mixture("mine", {"flan2022": 0.9, "riddles_zs_noopt": 0.1})`.
"""

from __future__ import annotations

from collections.abc import Mapping

from tasks import collection, collection_index, flan_cot, mixing, registry

MIXTURE = "flan2022"
FLAN_COT_TASKS = [flan_cot.task_name(d.name, v) for d in flan_cot.DATASETS for v in d.spec.variants]

_registered: list[str] = []  # Text tasks of the last `register`, removed by the next.
_submixtures: dict[str, collection_index.SubmixIndex] = {}


def register(root: str | None = None, recipe: Mapping[str, mixing.Collection] = mixing.FLAN_2022, *,
             template_weights: Mapping[str, float] | None = None, name: str = MIXTURE,
             shuffle_buffer_size: int = 2_000) -> mixing.RecipeMixture:
    """(Re-)records `name` over the export under `root` (default: `collection.collection_dir()`).

    `template_weights` weigh a submixture's template types (default: equally);
    `shuffle_buffer_size` is each submixture stream's buffer, in examples.

    `tasks.register()` runs it with the defaults; called again later, follow
    it with `tasks.register(again=True)` so that SeqIO sees the change.
    """
    for task in _registered:
        registry.remove_text_task(task)
    _registered.clear()
    _submixtures.clear()
    root = root or collection.collection_dir()
    present = collection.find_submixtures(root) if root else {}
    streams = {}
    for c, index in present.items():
        _, prefix = collection.SUBMIXTURES[c]
        for task, template in sorted(index.counts):
            task_name = collection.task_name(prefix, task, template)
            _registered.append(registry.add_text_task(
                task_name, collection.StreamSource(index, {(task, template): 1.0}, name=task_name)))
        keep = collection.recipe_acceptance(index.counts, recipe[c].cap, template_weights, recipe[c].inverted_rate)
        streams[c] = registry.add_text_task(f"{name}_{c}", collection.StreamSource(index, keep, name=f"{name}_{c}"),
                                            shuffle_buffer_size=shuffle_buffer_size)
        _registered.append(streams[c])
        _submixtures[c] = index
    # No warning (every command registers the tasks); `data list` reports the gap.
    return mixing.add_recipe(name, {"cot": FLAN_COT_TASKS}, recipe, streams=streams, warn=False)


def submixtures() -> dict[str, collection_index.SubmixIndex]:
    """The export's submixtures in the mixture, by collection."""
    return dict(_submixtures)
