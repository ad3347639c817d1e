"""The Flan-T5 paper's held-out evaluation as one suite: `flan-jax eval --suite=flan_heldout`.

Six suites, as the paper (arXiv 2210.11416) reports them: MMLU-Direct and
MMLU-CoT (5-shot, on the validation split, as the paper does outside its
Tables 1 and 4), BBH-Direct and BBH-CoT (3-shot, the unweighted average of
the 27 tasks), TyDiQA-Direct (1-shot, exact match, 8 languages) and MGSM-CoT
(8-shot, 10 languages). The headline is their *normalized average*: each
suite's score normalized against its random-guess lower bound
(`suites.normalize`: MMLU 25%, BBH each task's chance, TyDiQA and MGSM 0),
then the macro average of the six.

`flan_heldout_mmlu_test` is the same with MMLU on its test split (the
paper's Tables 1 and 4). GSM8K (`gsm8k_cot`) is not in the paper's average:
`--suite=flan_heldout,gsm8k_cot` reports it beside as an extra.
"""

from __future__ import annotations

import dataclasses

from flan_jax.suites import CompositeSuite, Suite
from tasks import registry

MEMBERS = ("mmlu_direct", "mmlu_cot", "bbh_direct", "bbh_cot", "tydiqa_direct", "mgsm_cot")
MMLU_SUITES = ("mmlu_direct", "mmlu_cot")


def members(mmlu_split: str) -> list[Suite]:
    """The six suites, MMLU on `mmlu_split`."""
    suites = [registry.get_suite(name) for name in MEMBERS]
    return [dataclasses.replace(s, split=mmlu_split) if s.name in MMLU_SUITES else s for s in suites]


def register() -> None:
    for name, split in (("flan_heldout", "validation"), ("flan_heldout_mmlu_test", "test")):
        registry.add_suite(CompositeSuite(
            name, f"the Flan-T5 paper's held-out benchmarks (MMLU on {split}), normalized average of six",
            members=lambda split=split: members(split),
        ))

