"""SVAMP arithmetic word problems (Patel et al., 2021, "Are NLP Models really able to Solve Simple
Math Word Problems?"), prompted and graded as GSM8K.

Hub source: ``ChilleD/SVAMP`` (https://huggingface.co/datasets/ChilleD/SVAMP), no config, splits
``train`` (700) and ``test`` (300), the 1,000 SVAMP problems split 70/30 with seed 42. Row schema
as ``datasets`` returns it: ``ID`` (str), ``Body`` (str, the narrative), ``Question`` (str, the
question sentence), ``Equation`` (str), ``Answer`` (float64, e.g. ``8.0``), ``Type`` (str),
``question_concat`` (str, ``Body + " " + Question``).
"""

from __future__ import annotations

from typing import Any

from mipo.data.tasks.base import Example, parse_gold_number, require_text
from mipo.data.tasks.gsm8k import Gsm8kTask


class SvampTask(Gsm8kTask):
    """SVAMP with GSM8K's prompt and grading.

    Wei et al. (2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models",
    Table 20) prompt SVAMP with the same 8 chain-of-thought exemplars as GSM8K, so the prompt is
    :class:`Gsm8kTask`'s (instruction, ``num_fewshot`` exemplars, ``Question: ...\\nAnswer:``) and
    the grade is exact match of the number after ``####``.

    The question is ``Body`` then ``Question``. ``partial`` (inherited) drops one sentence of the
    Body: the final question sentence is protected, as for GSM8K, so a one-sentence Body can be
    dropped whole, leaving the question without its numbers.
    """

    name = "svamp"
    hub_dataset = "ChilleD/SVAMP"
    hub_config = None
    hub_splits = ("train", "test")
    offline_files = ()

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``Body`` and ``Question`` (strings) and ``Answer`` (a number)."""
        question = f"{require_text(row, 'Body', where)} {require_text(row, 'Question', where)}"
        return Example(uid=uid, question=question, answer=parse_gold_number(row, "Answer", where))
